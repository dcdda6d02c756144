"""The memory stack on the carried thinking state: episodic snapshots (`episodic`), Hebbian plasticity and its
Trainer callback (`plasticity`), sleep and its Trainer callback (`sleep`), and the phase-4 conversation (`session`).
These modules import the model files and each other, never the training code or the pictures."""

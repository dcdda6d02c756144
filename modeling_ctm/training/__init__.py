"""The developmental training: the phase registry (`phases`), the Trainers (`trainers`), a run's pieces and the main
job (`runs`, `main_job`), and the data and tokenizer (`data`, `tokenization`)."""

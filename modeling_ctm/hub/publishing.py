"""Publish a run's phase checkpoints to the Hugging Face Hub (or any server speaking its API, via `HF_ENDPOINT`).

One repository per phase, plus the run's own name for the finished model:

    NAMESPACE/NAME-phase1-language     phase 1 (base_model: none)
    NAMESPACE/NAME-phase2-thinking     phase 2 (base_model: ...-phase1-language)
    NAMESPACE/NAME-phase3-continuity   phase 3 (base_model: ...-phase2-thinking)
    NAMESPACE/NAME                     the last phase again (what `from_pretrained("NAMESPACE/NAME")` should give)

Why repositories rather than branches of one repo: the Hub's `base_model` metadata names a repository, not a
revision, so only separate repos let each card link the phase it grew from (and the Hub draw the model tree); each
phase also gets its own model-index, download count and lm-eval target (`pretrained=NAMESPACE/NAME-phase2-thinking`).
Every push of a run is still reachable by revision: each repo's commit id is returned and printed.

What each repo receives, in ONE commit (so it never shows half a checkpoint): every file of the phase's `model/`
folder -- weights, config, tokenizer, the remote code (`modeling_ctm.py`, `configuration_ctm.py`), generation config,
`eval_results.json`, and any folder a phase saves next to its weights (e.g. an episodic memory) -- with the model card
rewritten for the Hub: `ModelCardData` with `base_model` linking the phases, `datasets`, `library_name`,
`pipeline_tag` and a `model-index` of the held-out results built from `EvalResult`s. Pushing a run that already
exists updates it: files the new checkpoint no longer has are deleted in the same commit.

Everything is read and checked before the first request, so a bad run folder publishes nothing; a failure while
pushing leaves the repos already committed at the new run and the others at their previous state, never a mix inside
one repo. `HF_TOKEN` and `HF_ENDPOINT` are honoured as everywhere in huggingface_hub (or pass `token=`/`endpoint=`).

    python -m modeling_ctm.hub.publishing RUN_DIR NAMESPACE/NAME [--private] [--dataset ID]
"""

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, EvalResult, HfApi, ModelCard, ModelCardData
from transformers.dynamic_module_utils import get_relative_imports

from ..training.phases import PHASES


REQUIRED_FILES = ("config.json", "model.safetensors", "modeling_ctm.py", "configuration_ctm.py", "README.md")


def missing_files(folder: Path) -> list[str]:
    """The required files a checkpoint folder lacks, with every sibling its own `modeling_ctm.py` imports as remote
    code (so a checkpoint saved before or after a change of the model files is checked against its own files)."""
    missing = [name for name in REQUIRED_FILES if not (folder / name).exists()]
    queue = [] if "modeling_ctm.py" in missing else ["modeling_ctm.py"]
    seen = set(queue)
    while queue:  # transformers' own import scan, followed through the siblings that are there
        for module in get_relative_imports(str(folder / queue.pop())):
            name = f"{module}.py"
            if name in seen:
                continue
            seen.add(name)
            if (folder / name).exists():
                queue.append(name)
            else:
                missing.append(name)
    return missing
KEEP_REMOTE = (".gitattributes",)  # files the Hub creates itself
MODEL_INDEX_METRICS = ("eval_loss", "eval_bpb")  # held-out losses and bits per byte (all readouts); not diagnostics


@dataclass
class PhaseUpload:
    """One repo's commit, prepared locally before anything is sent."""

    phase: int
    repo_id: str
    folder: Path
    card: ModelCard
    files: dict[str, Path] = field(default_factory=dict)  # path in repo -> local file


def phase_repo_id(repo_id: str, phase: int) -> str:
    return f"{repo_id}-phase{phase}-{PHASES[phase].name}"


def find_phase_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """The final model folder of every phase in a run folder (`phase1-language/model`, ...), by phase number."""
    run_dir = Path(run_dir)
    found = {}
    for number, phase in PHASES.items():
        folder = run_dir / phase.folder / "model"
        if (folder / "config.json").exists():
            found[number] = folder
    if not found:
        raise ValueError(f"run_dir={str(run_dir)!r} has no phase checkpoints (expected phase<N>-<name>/model folders)")
    return dict(sorted(found.items()))


def hub_card(folder: Path, repo_id: str, base_model: str | None, datasets: list[str] | None) -> ModelCard:
    """The phase card with Hub metadata: the local ids become repo ids, and the held-out metrics a model-index."""
    card = ModelCard.load(folder / "README.md")
    old = card.data.to_dict()
    text = card.text
    if old.get("base_model") and base_model:
        text = text.replace(old["base_model"], base_model)
    if old.get("model_name"):
        text = text.replace(f'"{old["model_name"]}"', f'"{repo_id}"')
    eval_match = re.search(r"## Evaluation \(held-out: (.+?)\)\n", text)
    metrics_path = folder / "eval_results.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    eval_results = [
        EvalResult(
            task_type="text-generation",
            task_name="Causal language modeling",
            dataset_type=datasets[0] if datasets else "text",
            dataset_name=eval_match.group(1) if eval_match else "held-out text",
            dataset_split="held-out",
            metric_type=key.removeprefix("eval_"),
            metric_name=key.removeprefix("eval_"),
            metric_value=float(value),
        )
        for key, value in sorted(metrics.items())
        if key.startswith(MODEL_INDEX_METRICS) and isinstance(value, (int, float))
    ]
    card.data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=old.get("license"),
        tags=old.get("tags"),
        base_model=base_model,
        datasets=datasets,
        model_name=repo_id,
        eval_results=eval_results or None,
    )
    card.text = text
    return card


def prepare_run(run_dir: str | Path, repo_id: str, datasets: list[str] | None = None) -> list[PhaseUpload]:
    """Read and check every phase of the run; no network. The last phase is prepared twice: its phase repo and
    `repo_id` itself."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"repo_id={repo_id!r} is invalid: allowed values are NAMESPACE/NAME")
    uploads, previous = [], None
    phases = find_phase_checkpoints(run_dir)
    targets = [(phase, phase_repo_id(repo_id, phase)) for phase in phases]
    targets.append((list(phases)[-1], repo_id))
    for phase, target in targets:
        folder = phases[phase]
        missing = missing_files(folder)
        if missing:
            raise ValueError(f"{folder} cannot be published: it lacks {missing}")
        base_model = previous if target != repo_id else uploads[-1].card.data.base_model
        card = hub_card(folder, target, base_model, datasets)
        files = {
            path.relative_to(folder).as_posix(): path
            for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != "README.md"
        }
        uploads.append(PhaseUpload(phase, target, folder, card, files))
        previous = target
    return uploads


def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    datasets: list[str] | None = None,
    private: bool | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> dict[str, str]:
    """Push every phase checkpoint of `run_dir` (see the module docstring). Returns {repo id: commit id}."""
    uploads = prepare_run(run_dir, repo_id, datasets)
    api = HfApi(endpoint=endpoint, token=token)
    commits = {}
    for upload in uploads:
        api.create_repo(upload.repo_id, private=private, exist_ok=True)
        existing = set(api.list_repo_files(upload.repo_id))
        operations = [CommitOperationAdd(path, str(local)) for path, local in upload.files.items()]
        operations.append(CommitOperationAdd("README.md", str(upload.card).encode()))
        stale = existing - set(upload.files) - {"README.md", *KEEP_REMOTE}
        operations += [CommitOperationDelete(path) for path in sorted(stale)]
        info = api.create_commit(
            upload.repo_id,
            operations,
            commit_message=commit_message or f"phase {upload.phase} ({PHASES[upload.phase].name}) from {Path(run_dir).name}",
        )
        commits[upload.repo_id] = info.oid
    return commits


def main(argv=None):
    parser = argparse.ArgumentParser(description="Push every phase checkpoint of a run to the Hub.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("repo_id", help="NAMESPACE/NAME; phases go to NAME-phase<N>-<name>, the last also to NAME")
    parser.add_argument("--dataset", action="append", help="Hub dataset id(s) for the card's `datasets`")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    for repo, commit in push_run(args.run_dir, args.repo_id, datasets=args.dataset, private=args.private).items():
        print(f"{repo} @ {commit}")


if __name__ == "__main__":
    main()

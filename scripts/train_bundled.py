"""Train the bundled Mixtral-architecture model and its tokenizer (DESIGN.md §3).

Reads the corpus written by scripts/build_corpus.py (build/corpus/<domain>.txt), trains a
byte-level BPE tokenizer, then a small MixtralForCausalLM (8 experts, top-2) whose every
batch holds one window from each domain, with Mixtral's own load-balancing loss on every layer.
Writes to assets/model/: the model (safetensors), config, tokenizer, training_log.csv,
training_loss.png and unigram_counts.json (the training corpus's token counts, the
baseline for the perplexity test).

Usage: python scripts/train_bundled.py --steps 1100 --minutes 33 --seed 0
"""

import argparse
import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Spinning OpenMP threads stall each other when other processes share the two cores
# (measured: 16-50 s/step instead of ~6); passive waiting must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ["english", "german", "spanish", "italian", "russian", "python", "c", "math"]
DOC_SEPARATOR = "\n\x1e\n"  # as written by build_corpus.py
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
BOS_ID, EOS_ID, PAD_ID = (SPECIAL_TOKENS.index(t) for t in ("<s>", "</s>", "<pad>"))


@dataclass(frozen=True)
class TrainConfig:
    corpus_dir: Path = ROOT / "build" / "corpus"
    samples_dir: Path = ROOT / "assets" / "samples"
    out_dir: Path = ROOT / "assets" / "model"
    seed: int = 0
    steps: int = 1100
    minutes: float = 33.0  # wall-time budget; 0 = none. The schedule ends with whichever runs out first.
    threads: int = 2
    # tokenizer
    vocab_size: int = 8192
    # model: ~8 M parameters, ~32 MB in fp32 (the asset budget is 40 MB)
    hidden_size: int = 192
    intermediate_size: int = 256  # per expert
    num_layers: int = 5
    num_heads: int = 6
    num_kv_heads: int = 2
    num_experts: int = 8
    experts_per_token: int = 2
    router_aux_loss_coef: float = 0.02
    # data: one window per domain per step keeps every batch a mix of all domains
    seq_len: int = 512
    windows_per_domain: int = 1
    # optimiser
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100


# ---------------------------------------------------------------- tokenizer


def read_documents(cfg: TrainConfig) -> dict[str, list[str]]:
    """Training documents per domain, in corpus order."""
    docs = {}
    for domain in DOMAINS:
        path = cfg.corpus_dir / f"{domain}.txt"
        if not path.exists():
            raise SystemExit(f"Missing {path}; build the corpus first: python scripts/build_corpus.py")
        docs[domain] = path.read_text(encoding="utf-8").split(DOC_SEPARATOR)
    return docs


def train_tokenizer(docs: dict[str, list[str]], cfg: TrainConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE over all domains. Offsets are character offsets into the original text
    and cover a token's leading space (trim_offsets=False), so spans tile the text."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((d for domain in DOMAINS for d in docs[domain]), trainer)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=cfg.seq_len,
    )


def encode_domains(tokenizer: PreTrainedTokenizerFast, docs: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Per domain, one token stream: documents joined by </s>. int32[tokens]"""
    streams = {}
    for domain in DOMAINS:
        encoded = tokenizer.backend_tokenizer.encode_batch(docs[domain], add_special_tokens=False)
        ids = [i for enc in encoded for i in (*enc.ids, EOS_ID)]
        streams[domain] = np.array(ids, dtype=np.int32)
    return streams


def save_unigram_counts(streams: dict[str, np.ndarray], cfg: TrainConfig) -> None:
    counts = np.bincount(np.concatenate(list(streams.values())), minlength=cfg.vocab_size)
    payload = {
        "description": "Token counts over the training corpus of all domains "
                       "(documents joined by </s>), the baseline for the perplexity test.",
        "counts": counts.tolist(),
    }
    (cfg.out_dir / "unigram_counts.json").write_text(json.dumps(payload))


# ---------------------------------------------------------------- model and data


def mixtral_config(cfg: TrainConfig) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.seq_len,
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
        output_router_logits=True, router_aux_loss_coef=cfg.router_aux_loss_coef,
        sliding_window=None, tie_word_embeddings=True,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )


def sample_batch(streams: dict[str, np.ndarray], rng: np.random.Generator, cfg: TrainConfig) -> torch.Tensor:
    """`windows_per_domain` random windows from every domain, each led by <s>.
    int64[domains * windows_per_domain, seq_len]"""
    rows = []
    for domain in DOMAINS:
        stream = streams[domain]
        for start in rng.integers(0, len(stream) - cfg.seq_len, size=cfg.windows_per_domain):
            rows.append(np.concatenate([[BOS_ID], stream[start:start + cfg.seq_len - 1]]))
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def heldout_windows(tokenizer: PreTrainedTokenizerFast, cfg: TrainConfig) -> list[torch.Tensor]:
    """The held-out samples cut into windows of at most seq_len tokens, each led by <s>."""
    windows = []
    for domain in DOMAINS:
        text = (cfg.samples_dir / f"{domain}.txt").read_text(encoding="utf-8")
        ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        for i in range(0, len(ids), cfg.seq_len - 1):
            windows.append(torch.tensor([[BOS_ID, *ids[i:i + cfg.seq_len - 1]]]))
    return windows


@torch.no_grad()
def heldout_loss(model: MixtralForCausalLM, windows: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats) over all held-out tokens."""
    model.eval()
    total, count = 0.0, 0
    for ids in windows:
        out = model(input_ids=ids, labels=ids, output_router_logits=False)
        total += out.loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    model.train()
    return total / count


def per_layer_balancing_loss(router_logits: tuple[torch.Tensor, ...], cfg: TrainConfig) -> torch.Tensor:
    """Mixtral's own load-balancing loss, applied to each layer alone. float[layers]

    Given all layers at once, transformers' version balances only the load summed over
    layers, so one layer's idle expert can hide behind another layer's busy one (measured:
    an expert with 0.0% of layer 3's held-out load while that loss read 2.00, its balanced
    value). router_logits: one float[tokens, experts] per layer."""
    return torch.stack([
        load_balancing_loss_func((logits,), cfg.num_experts, cfg.experts_per_token) for logits in router_logits
    ])


def make_optimizer(model: MixtralForCausalLM, cfg: TrainConfig) -> torch.optim.AdamW:
    # nanoGPT's rule: decay matrices (incl. 3-D expert tensors and the router), not norms.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def learning_rate(step: int, elapsed: float, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr. Progress is the larger of the
    step fraction and the time fraction, so a run cut short by --minutes still cools down."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    time_progress = elapsed / (cfg.minutes * 60) if cfg.minutes else 0.0
    progress = min(1.0, max((step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps), time_progress))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


# ---------------------------------------------------------------- training loop


def train(model: MixtralForCausalLM, streams: dict[str, np.ndarray], windows: list[torch.Tensor],
          cfg: TrainConfig) -> list[dict]:
    """Run the schedule; returns one log row per step."""
    rng = np.random.default_rng(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    log, start = [], time.monotonic()
    for step in range(cfg.steps):
        elapsed = time.monotonic() - start
        if cfg.minutes and elapsed > cfg.minutes * 60:
            print(f"time budget of {cfg.minutes} min reached after {step} steps")
            break
        lr = learning_rate(step, elapsed, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = sample_batch(streams, rng, cfg)
        out = model(input_ids=ids)
        lm_loss = model.loss_function(out.logits, ids, cfg.vocab_size)
        aux = per_layer_balancing_loss(out.router_logits, cfg)
        (lm_loss + cfg.router_aux_loss_coef * aux.mean()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {
            "step": step + 1, "lr": lr,
            "loss": lm_loss.item(), "aux_loss": aux.mean().item(),
            "aux_loss_worst_layer": aux.max().item(), "heldout_loss": "",
            "elapsed_s": round(time.monotonic() - start, 1),
        }
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            row["heldout_loss"] = heldout_loss(model, windows)
        log.append(row)
        if (step + 1) % cfg.log_every == 0 or row["heldout_loss"] != "":
            print_progress(row)
    if log and log[-1]["heldout_loss"] == "":
        log[-1]["heldout_loss"] = heldout_loss(model, windows)
        print_progress(log[-1])
    return log


def print_progress(row: dict) -> None:
    heldout = f" heldout {row['heldout_loss']:.3f}" if row["heldout_loss"] != "" else ""
    print(f"step {row['step']:5d}  loss {row['loss']:.3f}  aux {row['aux_loss']:.3f} "
          f"(worst layer {row['aux_loss_worst_layer']:.3f})  "
          f"lr {row['lr']:.2e}  {row['elapsed_s'] / row['step']:.2f} s/step  "
          f"{row['elapsed_s'] / 60:.1f} min{heldout}", flush=True)


def write_log(log: list[dict], cfg: TrainConfig) -> None:
    with open(cfg.out_dir / "training_log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log)


def plot_log(log: list[dict], cfg: TrainConfig) -> None:
    """Language-model loss (train, smoothed, held-out) and the load-balancing loss per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in log])
    loss = np.array([r["loss"] for r in log])
    aux = np.array([r["aux_loss"] for r in log])
    aux_worst = np.array([r["aux_loss_worst_layer"] for r in log])
    evals = [(r["step"], r["heldout_loss"]) for r in log if r["heldout_loss"] != ""]
    width = min(50, len(loss))
    smooth = np.convolve(loss, np.ones(width) / width, mode="valid")

    fig, (ax_loss, ax_aux) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[2, 1])
    ax_loss.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
    ax_loss.plot(steps[width - 1:], smooth, color="tab:blue", label=f"train ({width}-step mean)")
    ax_loss.plot(*zip(*evals), "o-", color="tab:orange", label="held-out samples")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.legend()
    ax_loss.set_title("Bundled Mixtral: training loss")
    ax_aux.plot(steps, aux, color="tab:green", linewidth=0.8, label="load-balancing loss (mean of layers)")
    ax_aux.plot(steps, aux_worst, color="tab:red", linewidth=0.8, alpha=0.6, label="worst layer")
    ax_aux.axhline(cfg.experts_per_token, color="gray", linestyle="--", label="perfectly balanced (= k)")
    ax_aux.set_xlabel("step")
    ax_aux.set_ylabel("aux loss")
    ax_aux.legend()
    fig.tight_layout()
    fig.savefig(cfg.out_dir / "training_loss.png", dpi=110)
    plt.close(fig)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--minutes", type=float, default=TrainConfig.minutes,
                        help="wall-time budget; 0 disables it (then a run is fully reproducible)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--out", type=Path, default=TrainConfig.out_dir)
    args = parser.parse_args()
    cfg = TrainConfig(steps=args.steps, minutes=args.minutes, seed=args.seed, out_dir=args.out)

    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)

    docs = read_documents(cfg)
    tokenizer = train_tokenizer(docs, cfg)
    streams = encode_domains(tokenizer, docs)
    for domain, stream in streams.items():
        print(f"{domain:<8} {len(stream):>9,} training tokens")
    save_unigram_counts(streams, cfg)

    model = MixtralForCausalLM(mixtral_config(cfg))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; training {cfg.steps} steps of "
          f"{len(DOMAINS) * cfg.windows_per_domain} x {cfg.seq_len} tokens")
    log = train(model, streams, heldout_windows(tokenizer, cfg), cfg)
    write_log(log, cfg)
    plot_log(log, cfg)

    # Ship the config the way hub checkpoints do: routing outputs are opt-in at inference.
    model.config.output_router_logits = False
    model.save_pretrained(cfg.out_dir)
    tokenizer.save_pretrained(cfg.out_dir)
    hyperparameters = {k: v for k, v in asdict(cfg).items() if not isinstance(v, Path)}
    (cfg.out_dir / "train_config.json").write_text(json.dumps(hyperparameters, indent=2) + "\n")
    last = log[-1]
    print(f"saved to {cfg.out_dir}: {len(log)} steps in {last['elapsed_s'] / 60:.1f} min, "
          f"loss {last['loss']:.3f}, aux {last['aux_loss']:.3f}, held-out {last['heldout_loss']:.3f}")


if __name__ == "__main__":
    main()

"""Train a bundled model and its tokenizer (DESIGN.md §3): the Mixtral-style model in
assets/model or the DeepSeek-style model in assets/model-deepseek.

Reads the corpus written by scripts/build_corpus.py (build/corpus/<domain>.txt), trains a
byte-level BPE tokenizer (the same for both models), then one of:

- mixtral:  MixtralForCausalLM, 8 experts, softmax top-2, balanced by the capacity loss below
  alone (no batch-wide loss);
- deepseek: DeepseekV3ForCausalLM, 32 fine-grained routed experts (top-4 within 2 of 4
  groups) beside one shared expert, sigmoid scores, and the auxiliary-loss-free bias update
  of arXiv 2408.15664 (b_i += u * sign(mean load - load_i) after every step).

Both also get a per-sequence capacity loss (`capacity_loss`): balancing only the batch, which
mixes the eight domains, let each domain take its own expert (the first bundled model routed by
document); DeepSeek-V3's sequence-wise f·P loss (arXiv 2412.19437 Eq. 17-20) stops that but
evens every document's load, and with it the difference between domains. The capacity loss
only pushes back on an expert that takes more than a set share of a sequence's first choices
(a quarter for DeepSeek's 32 experts, 0.35 for Mixtral's 8).

Training runs at 512 positions, then at the full 2,048 for its last quarter (as real models
extend their context late). At eight points it records the held-out samples' routing
(expert ids, not weights) and the DeepSeek biases: training_history.{json,npz}, read by the
app's Training page. Also writes the model (safetensors), config, tokenizer, training_log.csv,
training_loss.png and unigram_counts.json (the baseline for the perplexity test).

Usage (the bundled models' runs, each sharing the 2 cores with another run):
       python scripts/train_bundled.py --arch mixtral --minutes 48 --threads 1 --seed 0
       python scripts/train_bundled.py --arch deepseek --minutes 50 --threads 2 --seed 0
"""

import argparse
import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# Spinning OpenMP threads stall each other when other processes share the two cores
# (measured: 16-50 s/step instead of ~6); passive waiting must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedModel,
    PreTrainedTokenizerFast,
)

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ["english", "german", "spanish", "italian", "russian", "python", "c", "math"]
DOC_SEPARATOR = "\n\x1e\n"  # as written by build_corpus.py
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
BOS_ID, EOS_ID, PAD_ID = (SPECIAL_TOKENS.index(t) for t in ("<s>", "</s>", "<pad>"))
# Training progress (the larger of the step and time fractions) at which the held-out
# routing is recorded: dense early, where routers saturate fastest (OLMoE, Fig. 9).
HISTORY_POINTS = (0.0, 0.03, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "mixtral"  # or "deepseek"
    corpus_dir: Path = ROOT / "build" / "corpus"
    samples_dir: Path = ROOT / "assets" / "samples"
    out_dir: Path = ROOT / "assets" / "model"
    seed: int = 0
    steps: int = 5000
    minutes: float = 55.0  # wall-time budget; 0 = none. The schedule ends with whichever runs out first.
    threads: int = 2
    # tokenizer
    vocab_size: int = 8192
    # model (~8 M parameters, ~32 MB in fp32; the budget is 40 MB a model)
    hidden_size: int = 192
    num_layers: int = 5
    num_heads: int = 6
    num_kv_heads: int = 2
    num_experts: int = 8
    experts_per_token: int = 2
    expert_intermediate: int = 256
    shared_experts: int = 0
    dense_layers: int = 0  # leading layers with a dense MLP instead of experts (DeepSeek)
    dense_intermediate: int = 0
    expert_groups: int = 1  # DeepSeek's group-limited routing: top-k within topk_groups of these
    topk_groups: int = 1
    # balancing, per layer and averaged over layers
    batch_balance_coef: float = 0.02  # Switch/DeepSeek-V3 f·P over the batch; 1.0 when balanced
    # Per sequence, only the experts over a capacity: E * sum_i relu(f_i - capacity) * P_i, f_i the
    # share of the sequence's first choices that went to expert i. DeepSeek-V3's own sequence-wise
    # f·P loss (coefficient 0.1) stopped routing by document but also evened every document's load,
    # so domains no longer differed (specialisation ratio 9.9 -> 2.4-1.1 in later layers).
    sequence_capacity: float = 0.25
    sequence_capacity_coef: float = 0.5
    bias_update_speed: float = 0.0  # u of the auxiliary-loss-free update; 0 = none
    # data: one window per domain per step keeps every batch a mix of all domains
    max_positions: int = 2048
    seq_len: int = 512
    long_from: float = 0.75  # progress from which windows are max_positions long
    # optimiser
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100


ARCHS = {
    # Per sequence only: with a batch-wide f·P loss (0.02) beside it the domains' loads converged
    # (specialisation 2.1x untrained); the capacity loss alone keeps every expert under 35% of a
    # sequence's first choices and the load balanced enough (held out: 6.6-18.9% per expert).
    "mixtral": TrainConfig(batch_balance_coef=0.0, sequence_capacity=0.35, sequence_capacity_coef=0.5),
    "deepseek": TrainConfig(
        arch="deepseek", out_dir=ROOT / "assets" / "model-deepseek", num_layers=6, num_kv_heads=6,
        num_experts=32, experts_per_token=4, expert_intermediate=64, shared_experts=1,
        dense_layers=1, dense_intermediate=512, expert_groups=4, topk_groups=2,
        # Balanced over the batch by the biases alone, as DeepSeek-V3; its tiny sequence-wise loss
        # (1e-4) is replaced by the capacity loss: with biases and 1e-3, samples still sent 50-98%
        # of their first choices to one expert at step 41.
        batch_balance_coef=0.0, bias_update_speed=0.001,
    ),
}


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
        pad_token="<pad>", model_max_length=cfg.max_positions,
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


# ---------------------------------------------------------------- models


def build_model(cfg: TrainConfig) -> PreTrainedModel:
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_positions, num_experts_per_tok=cfg.experts_per_token,
        tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    if cfg.arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(
            **common, intermediate_size=cfg.expert_intermediate, num_local_experts=cfg.num_experts,
            router_aux_loss_coef=cfg.batch_balance_coef, sliding_window=None,
        ))
    # DeepSeek-V3's multi-head latent attention, scaled down: 6 heads of 32 (+16 rotary) dims
    # reading keys and values from a 64-dim latent.
    return DeepseekV3ForCausalLM(DeepseekV3Config(
        **common, n_routed_experts=cfg.num_experts, moe_intermediate_size=cfg.expert_intermediate,
        n_shared_experts=cfg.shared_experts, first_k_dense_replace=cfg.dense_layers,
        intermediate_size=cfg.dense_intermediate, n_group=cfg.expert_groups, topk_group=cfg.topk_groups,
        norm_topk_prob=True, routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=64,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
    ))


def routers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The MoE layers' routers, in layer order (dense layers have none)."""
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]


class RouterTap:
    """Holds each router's (logits, selected expert ids, their weights) from the last forward
    pass; logits keep their gradient. Both families' routers return (logits, weights, ids)."""

    def __init__(self, model: PreTrainedModel):
        self.outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.handles = [gate.register_forward_hook(self._record) for gate in routers(model)]

    def _record(self, module, args, output) -> None:
        logits, weights, ids = output
        self.outputs.append((logits, ids, weights))

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        outputs, self.outputs = self.outputs, []
        return outputs


def router_probabilities(logits: torch.Tensor, arch: str) -> torch.Tensor:
    """Each token's affinity to each expert, summing to 1: softmax for Mixtral; DeepSeek-V3's
    sigmoid scores normalised over all experts (its Eq. 19, s'). float[tokens, experts]"""
    if arch == "mixtral":
        return torch.softmax(logits.float(), dim=-1)
    scores = torch.sigmoid(logits.float())
    return scores / scores.sum(dim=-1, keepdim=True)


def balance_loss(probs: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """N/K * sum_i f_i P_i per group of tokens (DeepSeek-V3 Eq. 17-20; Switch Transformer's
    loss for K = 1): f_i the share of the group's K selections that went to expert i, P_i its
    mean affinity. 1.0 when balanced. probs float[groups, tokens, experts], ids int[groups,
    tokens, K] -> float[groups]"""
    k = ids.shape[-1]
    selected = torch.zeros_like(probs).scatter_add_(-1, ids, torch.ones_like(ids, dtype=probs.dtype))
    f = selected.mean(dim=1) * num_experts / k
    return (f * probs.mean(dim=1)).sum(dim=-1)


def first_choices(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's highest-weighted expert (DeepSeek's top-k comes unsorted). int[tokens]"""
    return ids.gather(-1, weights.argmax(dim=-1, keepdim=True))[..., 0]


def capacity_loss(probs: torch.Tensor, first: torch.Tensor, capacity: float) -> torch.Tensor:
    """E * sum_i relu(f_i - capacity) * P_i per sequence: f_i the share of its first choices
    that went to expert i, P_i its mean affinity. 0 while no expert is over capacity. probs
    float[rows, tokens, experts], first int[rows, tokens] -> float[rows]"""
    num_experts = probs.shape[-1]
    share = torch.zeros_like(probs[:, 0]).scatter_add_(-1, first, torch.ones_like(first, dtype=probs.dtype))
    share = share / first.shape[1]
    return num_experts * (torch.relu(share - capacity) * probs.mean(dim=1)).sum(dim=-1)


def balance_losses(taps, batch_shape: tuple[int, int], cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: the balance loss over the whole batch, and the capacity loss averaged over
    sequences. float[layers] each"""
    rows, length = batch_shape
    batch, sequence = [], []
    for logits, ids, weights in taps:
        probs = router_probabilities(logits, cfg.arch)
        batch.append(balance_loss(probs[None], ids[None], cfg.num_experts)[0])
        first = first_choices(ids, weights).view(rows, length)
        sequence.append(capacity_loss(probs.view(rows, length, -1), first, cfg.sequence_capacity).mean())
    return torch.stack(batch), torch.stack(sequence)


def max_violation(ids: torch.Tensor, num_experts: int) -> float:
    """MaxVio (arXiv 2408.15664 Eq. 4): (max_i load_i - mean load) / mean load."""
    load = torch.bincount(ids.flatten(), minlength=num_experts).float()
    return ((load.max() - load.mean()) / load.mean()).item()


@torch.no_grad()
def update_biases(model: PreTrainedModel, taps, cfg: TrainConfig) -> None:
    """Auxiliary-loss-free balancing (arXiv 2408.15664 Alg. 1): b_i += u * sign(mean load - load_i)."""
    for gate, (_, ids, _) in zip(routers(model), taps):
        load = torch.bincount(ids.flatten(), minlength=cfg.num_experts).float()
        gate.e_score_correction_bias += cfg.bias_update_speed * torch.sign(load.mean() - load)


def biases(model: PreTrainedModel) -> np.ndarray | None:
    """The DeepSeek routers' selection biases. float[moe_layers, experts], None for Mixtral"""
    gates = routers(model)
    if not hasattr(gates[0], "e_score_correction_bias"):
        return None
    return np.stack([g.e_score_correction_bias.detach().cpu().numpy().copy() for g in gates])


# ---------------------------------------------------------------- data


def training_progress(step: int, elapsed: float, cfg: TrainConfig) -> float:
    """The larger of the step and time fractions, in [0, 1]."""
    time_progress = elapsed / (cfg.minutes * 60) if cfg.minutes else 0.0
    return min(1.0, max(step / cfg.steps, time_progress))


def sample_batch(streams: dict[str, np.ndarray], rng: np.random.Generator, step: int, long: bool,
                 cfg: TrainConfig) -> torch.Tensor:
    """Short phase: one seq_len window from every domain. Long phase: the same number of
    tokens in max_positions windows from domains taken in turn. Each window is led by <s>.
    int64[rows, length]"""
    length = cfg.max_positions if long else cfg.seq_len
    rows = len(DOMAINS) * cfg.seq_len // length
    domains = [DOMAINS[(step * rows + i) % len(DOMAINS)] for i in range(rows)] if long else DOMAINS
    windows = []
    for domain in domains:
        stream = streams[domain]
        start = rng.integers(0, len(stream) - length)
        windows.append(np.concatenate([[BOS_ID], stream[start:start + length - 1]]))
    return torch.from_numpy(np.stack(windows).astype(np.int64))


def heldout_samples(tokenizer: PreTrainedTokenizerFast, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Each held-out sample as one window led by <s> (they are shorter than max_positions). int64[1, tokens]"""
    samples = {}
    for domain in DOMAINS:
        text = (cfg.samples_dir / f"{domain}.txt").read_text(encoding="utf-8")
        ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids[:cfg.max_positions - 1]
        samples[domain] = torch.tensor([[BOS_ID, *ids]])
    return samples


def cut_windows(samples: dict[str, torch.Tensor], window: int) -> list[torch.Tensor]:
    """The samples cut into windows of at most `window` tokens, each led by <s>."""
    out = []
    for ids in samples.values():
        body = ids[0, 1:].tolist()
        out += [torch.tensor([[BOS_ID, *body[i:i + window - 1]]]) for i in range(0, len(body), window - 1)]
    return out


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, windows: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats) over all held-out tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ids in windows:
        out = model(input_ids=ids, labels=ids)
        total += out.loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    model.train(was_training)
    return total / count


# ---------------------------------------------------------------- routing history


@torch.no_grad()
def heldout_routing(model: PreTrainedModel, tap: RouterTap, samples: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Per sample, the experts each MoE layer chose for each token after <s>, in order of
    their weight. int16[moe_layers, tokens, k] each"""
    was_training = model.training
    model.eval()
    routing = []
    for ids in samples.values():
        tap.take()
        model(input_ids=ids)
        layers = []
        for _, chosen, weights in tap.take():
            order = torch.argsort(weights, dim=-1, descending=True, stable=True)
            layers.append(chosen.gather(-1, order)[1:].numpy().astype(np.int16))
        routing.append(np.stack(layers))
    model.train(was_training)
    return routing


def routing_targets(routing: list[np.ndarray], num_experts: int) -> dict[str, float]:
    """The worst sample and layer's adjacent same-first-choice rate and most-used expert's
    first-choice share (the model card's targets: <= 0.35 and <= 0.40)."""
    adjacent, share = 0.0, 0.0
    for sample in routing:
        first = sample[:, :, 0]
        adjacent = max(adjacent, float((first[:, 1:] == first[:, :-1]).mean(axis=1).max()))
        counts = np.stack([np.bincount(layer, minlength=num_experts) for layer in first])
        share = max(share, float((counts.max(axis=1) / first.shape[1]).max()))
    return {"adjacent_same_first": adjacent, "top_first_share": share}


class History:
    """The held-out routing at HISTORY_POINTS, saved after every point so an interrupted run keeps its past."""

    def __init__(self, model: PreTrainedModel, samples: dict[str, torch.Tensor], cfg: TrainConfig):
        self.cfg, self.samples = cfg, samples
        self.moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
        self.points: list[dict] = []
        self.routing: list[list[np.ndarray]] = []
        self.biases: list[np.ndarray] = []

    def due(self, progress: float) -> bool:
        return len(self.points) < len(HISTORY_POINTS) and progress >= HISTORY_POINTS[len(self.points)]

    def record(self, model: PreTrainedModel, tap: RouterTap, step: int, tokens: int, elapsed: float,
               loss: float) -> dict:
        routing = heldout_routing(model, tap, self.samples)
        point = {"step": step, "tokens": tokens, "elapsed_s": round(elapsed, 1), "heldout_loss": round(loss, 4),
                 **{k: round(v, 4) for k, v in routing_targets(routing, self.cfg.num_experts).items()}}
        self.points.append(point)
        self.routing.append(routing)
        bias = biases(model)
        if bias is not None:
            self.biases.append(bias)
        self.save()
        return point

    def save(self) -> None:
        lengths = [r.shape[1] for r in self.routing[0]]
        experts = np.full((len(self.routing), len(self.samples), len(self.moe_layers), max(lengths),
                           self.cfg.experts_per_token), -1, dtype=np.int16)
        for p, routing in enumerate(self.routing):
            for s, sample in enumerate(routing):
                experts[p, s, :, :sample.shape[1]] = sample
        arrays = {"experts": experts, "lengths": np.array(lengths, dtype=np.int32)}
        if self.biases:
            arrays["biases"] = np.stack(self.biases).astype(np.float32)
        np.savez_compressed(self.cfg.out_dir / "training_history.npz", **arrays)
        meta = {
            "description": "Routing of the held-out samples (assets/samples) during training: experts "
                           "[point, sample, moe layer, token after <s>, rank by weight], -1 past a sample's "
                           "end; biases [point, moe layer, expert] for auxiliary-loss-free balancing.",
            "arch": self.cfg.arch, "samples": list(self.samples), "moe_layers": self.moe_layers,
            "num_experts": self.cfg.num_experts, "top_k": self.cfg.experts_per_token,
            "shared_experts": self.cfg.shared_experts, "points": self.points,
        }
        (self.cfg.out_dir / "training_history.json").write_text(json.dumps(meta, indent=1) + "\n")


# ---------------------------------------------------------------- training loop


def make_optimizer(model: PreTrainedModel, cfg: TrainConfig) -> torch.optim.AdamW:
    # nanoGPT's rule: decay matrices (incl. 3-D expert tensors and the router), not norms.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def learning_rate(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr over `progress`, so a run cut
    short by --minutes still cools down."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    warm = cfg.warmup_steps / cfg.steps
    cosine = 0.5 * (1 + math.cos(math.pi * max(0.0, (progress - warm) / (1 - warm))))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def train(model: PreTrainedModel, streams: dict[str, np.ndarray], samples: dict[str, torch.Tensor],
          cfg: TrainConfig) -> list[dict]:
    """Run the schedule, recording the routing history; returns one log row per step."""
    rng = np.random.default_rng(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    tap, history = RouterTap(model), History(model, samples, cfg)
    windows = list(samples.values())
    log, start, tokens, step = [], time.monotonic(), 0, 0
    print_point(history.record(model, tap, 0, 0, 0.0, heldout_loss(model, windows)))
    while True:
        progress = training_progress(step, time.monotonic() - start, cfg)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, progress, cfg)
        ids = sample_batch(streams, rng, step, progress >= cfg.long_from, cfg)
        tap.take()
        out = model(input_ids=ids)
        lm_loss = model.loss_function(out.logits, ids, cfg.vocab_size)
        taps = tap.take()
        batch_balance, sequence_capacity = balance_losses(taps, tuple(ids.shape), cfg)
        loss = lm_loss + cfg.batch_balance_coef * batch_balance.mean() + cfg.sequence_capacity_coef * sequence_capacity.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.bias_update_speed:
            update_biases(model, taps, cfg)
        step, tokens = step + 1, tokens + ids.numel()
        elapsed = time.monotonic() - start
        row = {
            "step": step, "lr": optimizer.param_groups[0]["lr"], "window": ids.shape[1], "loss": lm_loss.item(),
            "balance_batch": batch_balance.mean().item(), "capacity_sequence": sequence_capacity.mean().item(),
            "capacity_sequence_worst_layer": sequence_capacity.max().item(),
            "max_vio_worst_layer": max(max_violation(ids_, cfg.num_experts) for _, ids_, _ in taps),
            "heldout_loss": "", "elapsed_s": round(elapsed, 1),
        }
        done = training_progress(step, elapsed, cfg) >= 1.0
        if step % cfg.eval_every == 0 or done or history.due(training_progress(step, elapsed, cfg)):
            row["heldout_loss"] = heldout_loss(model, windows)
        log.append(row)
        if step % cfg.log_every == 0 or row["heldout_loss"] != "":
            print_progress(row)
        if done or history.due(training_progress(step, elapsed, cfg)):
            while history.due(1.0 if done else training_progress(step, elapsed, cfg)):
                print_point(history.record(model, tap, step, tokens, elapsed, row["heldout_loss"]))
    return log


def print_progress(row: dict) -> None:
    heldout = f" heldout {row['heldout_loss']:.3f}" if row["heldout_loss"] != "" else ""
    print(f"step {row['step']:5d}  loss {row['loss']:.3f}  balance batch {row['balance_batch']:.3f} "
          f"capacity {row['capacity_sequence']:.4f} (worst layer {row['capacity_sequence_worst_layer']:.4f})  "
          f"maxvio {row['max_vio_worst_layer']:.2f}  lr {row['lr']:.2e}  window {row['window']}  "
          f"{row['elapsed_s'] / row['step']:.2f} s/step  {row['elapsed_s'] / 60:.1f} min{heldout}", flush=True)


def print_point(point: dict) -> None:
    print(f"history: step {point['step']}, held-out loss {point['heldout_loss']:.3f}, worst adjacent "
          f"same first choice {point['adjacent_same_first']:.2f}, worst top first-choice share "
          f"{point['top_first_share']:.2f}", flush=True)


def write_log(log: list[dict], cfg: TrainConfig) -> None:
    with open(cfg.out_dir / "training_log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log)


def plot_log(log: list[dict], cfg: TrainConfig) -> None:
    """Language-model loss (train, smoothed, held-out) and the balance losses per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in log])
    loss = np.array([r["loss"] for r in log])
    evals = [(r["step"], r["heldout_loss"]) for r in log if r["heldout_loss"] != ""]
    width = min(50, len(loss))
    smooth = np.convolve(loss, np.ones(width) / width, mode="valid")

    fig, (ax_loss, ax_aux) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[2, 1])
    ax_loss.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
    ax_loss.plot(steps[width - 1:], smooth, color="tab:blue", label=f"train ({width}-step mean)")
    ax_loss.plot(*zip(*evals), "o-", color="tab:orange", label="held-out samples")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.legend()
    ax_loss.set_title(f"Bundled {cfg.arch}-style model: training loss")
    ax_aux.plot(steps, [r["balance_batch"] for r in log], color="tab:green", linewidth=0.8,
                label="batch balance loss (mean of layers; 1 = balanced)")
    ax_aux.plot(steps, [1 + r["capacity_sequence"] for r in log], color="tab:purple", linewidth=0.8,
                label="1 + sequence capacity loss (mean of layers)")
    ax_aux.axhline(1.0, color="gray", linestyle="--")
    ax_aux.set_xlabel("step")
    ax_aux.set_ylabel("balance loss")
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
    parser.add_argument("--arch", choices=list(ARCHS), default="mixtral")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--minutes", type=float, default=TrainConfig.minutes,
                        help="wall-time budget; 0 disables it (then a run is fully reproducible)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument("--capacity-coef", type=float, help="override the sequence capacity loss's coefficient")
    parser.add_argument("--capacity", type=float, help="override the share of first choices over which it acts")
    parser.add_argument("--batch-balance", type=float, help="override the batch balance loss's coefficient")
    parser.add_argument("--out", type=Path, help="output folder (default: the model's folder in assets/)")
    args = parser.parse_args()
    cfg = replace(ARCHS[args.arch], steps=args.steps, minutes=args.minutes, seed=args.seed, threads=args.threads)
    if args.out:
        cfg = replace(cfg, out_dir=args.out)
    overrides = {"sequence_capacity_coef": args.capacity_coef, "sequence_capacity": args.capacity,
                 "batch_balance_coef": args.batch_balance}
    cfg = replace(cfg, **{name: value for name, value in overrides.items() if value is not None})

    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)

    docs = read_documents(cfg)
    tokenizer = train_tokenizer(docs, cfg)
    streams = encode_domains(tokenizer, docs)
    for domain, stream in streams.items():
        print(f"{domain:<8} {len(stream):>9,} training tokens")
    save_unigram_counts(streams, cfg)
    tokenizer.save_pretrained(cfg.out_dir)

    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.arch}: {n_params:,} parameters; up to {cfg.steps} steps of "
          f"{len(DOMAINS) * cfg.seq_len} tokens in {cfg.minutes} min")
    samples = heldout_samples(tokenizer, cfg)
    log = train(model, streams, samples, cfg)
    write_log(log, cfg)
    plot_log(log, cfg)

    # Ship the config the way hub checkpoints do: routing outputs are opt-in at inference.
    model.config.output_router_logits = False
    model.save_pretrained(cfg.out_dir)
    hyperparameters = {k: v for k, v in asdict(cfg).items() if not isinstance(v, Path)}
    (cfg.out_dir / "train_config.json").write_text(json.dumps(hyperparameters, indent=2) + "\n")
    last = log[-1]
    print(f"saved to {cfg.out_dir}: {len(log)} steps in {last['elapsed_s'] / 60:.1f} min, loss {last['loss']:.3f}, "
          f"held-out {last['heldout_loss']:.3f} (in 512-token windows: "
          f"{heldout_loss(model, cut_windows(samples, cfg.seq_len)):.3f})")


if __name__ == "__main__":
    main()

"""The moeviz command line: `moeviz COMMAND` or `python -m moeviz COMMAND`.

    moeviz trace "def f(x): return x + 1" -o f.safetensors   routing of one text + a summary
    moeviz corpus docs/ -o run/                               a resumable corpus run (Parquet)
    moeviz serve                                              the app, on http://127.0.0.1:8501
    moeviz info                                               what a MoE model is, how it routes
    moeviz intervene "def f(x):" --ablate 2:5,7               re-run with experts ablated: the effect
    moeviz variants "def f(x):" --quantization-b nf4          the model against its 4-bit self, token by token

Commands import torch only once they need a model (moeviz.analysis.metrics does not), so `--help`,
argument errors and `serve` answer at once. Errors are one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from moeviz.analysis import metrics
from moeviz.trace import RoutingTrace

REPO = Path(__file__).resolve().parent.parent
MAX_TOKENS = 2048  # capture.DEFAULT_MAX_TOKENS, written out so that --help needs no torch (tested)

EXIT_STATUS = """exit status: 0 done, 1 failed (a file, run or model that cannot be used),
2 usage error (bad arguments, an input path that does not exist)"""


class UsageError(Exception):
    """The command line asks for something impossible: exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, or argparse's own usage error
        return exit.code if isinstance(exit.code, int) else 0
    try:
        return args.run(args)
    except UsageError as error:
        return _fail(f"moeviz {args.command}: error: {error}", 2)
    except (ValueError, OSError) as error:  # ModelLoadError, NoRoutersError, CorpusError, RunError, ...
        return _fail(f"moeviz {args.command}: {error}", 1)
    except KeyboardInterrupt:
        return _fail(f"moeviz {args.command}: interrupted", 130)


def _fail(message: str, status: int) -> int:
    print(" ".join(message.split()), file=sys.stderr)  # one line, whatever the error held
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeviz", epilog=EXIT_STATUS,
        description="See how a Mixture-of-Experts language model routes every token to its experts.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    trace = _command(commands, "trace", trace_command, "trace one text: a trace file and a summary table", (
        "Run a text through the model, capture the experts every token used in every MoE layer, "
        "print a summary per layer, and save the trace (open it in the app: Source > Trace file)."
    ))
    source = trace.add_mutually_exclusive_group(required=True)
    source.add_argument("text", nargs="?", help="the text to trace")
    source.add_argument("--file", type=Path, help="read the text from this UTF-8 file instead")
    trace.add_argument("-o", "--output", type=Path, metavar="FILE",
                       help="write the trace here (.safetensors); without it only the summary is printed")
    _max_tokens_option(trace, "cut the text after N tokens")
    trace.add_argument("--generate", type=_positive_int, metavar="N",
                       help="treat the text as a prompt, generate up to N tokens and trace those too")
    trace.add_argument("--temperature", type=float, metavar="T",
                       help="sampling temperature with --generate (default 0: greedy)")
    trace.add_argument("--seed", type=int, help="random seed of the sampling with --generate (default 0)")
    _model_option(trace)
    _server_options(trace)

    corpus = _command(commands, "corpus", corpus_command, "trace a corpus into a resumable Parquet run", (
        "Stream documents through the model in batches and append their per-token routing (document, "
        "domain, position, token, layer, top-k expert ids and weights) to Parquet part files in a run "
        "folder. Run it again on the same folder to resume: documents already done are skipped. "
        "Open the run in the app's Corpus run page."
    ))
    corpus.add_argument("source", type=Path, help=(
        "a folder of .txt files (domain = first sub-folder, id = relative path) or a .jsonl file "
        "(\"text\", optional \"id\" and \"domain\" per line)"))
    corpus.add_argument("-o", "--output", type=Path, required=True, metavar="RUN",
                        help="the run folder: new or empty, or an earlier run of the same model to resume")
    corpus.add_argument("--batch-size", type=_positive_int, default=8, metavar="B",
                        help="documents per forward pass and per part file (default: %(default)s)")
    _max_tokens_option(corpus, "cut each document after N tokens")
    _model_option(corpus)
    _server_options(corpus)

    serve = _command(commands, "serve", serve_command, "start the moeviz app", (
        "Start the Streamlit app. It listens on 127.0.0.1 only unless --address says otherwise."
    ))
    serve.add_argument("--address", default="127.0.0.1",
                       help="address to listen on (default: %(default)s; 0.0.0.0 shares the app with your network)")
    serve.add_argument("--port", type=_positive_int, default=8501, help="port (default: %(default)s)")
    serve.add_argument("--team", action="store_true",
                       help="serve a team: sign-in, allowlisted models and data folders, a fair queue "
                       "(settings from $MOEVIZ_MODELS etc.; see the README, \"Serving moeviz to a team\")")
    _model_option(serve)

    info = _command(commands, "info", info_command, "describe a MoE model", (
        "Load a model and print its family, layers (which are MoE), experts, top-k, scoring "
        "function, shared experts, router class, parameters, size and quantization; then what its "
        "weights need in full precision and in 4-bit, the device's free memory, and which of the two "
        "--quantization auto picks on this machine."
    ))
    _model_option(info)

    intervene = _command(commands, "intervene", intervene_command, "re-run a text with its routing changed", (
        "Run a text through the model as it routes, then again with experts ablated, forced or steered, "
        "another k or a capacity per expert, applied inside the forward pass; print how the log-probability "
        "of each actual next token, the perplexity and the routing of later layers changed. Layers are the "
        "model's own numbers (see `moeviz info`)."
    ))
    intervene.add_argument("text", help="the text to run")
    intervene.add_argument("--ablate", action="append", type=_layer_experts, default=[], metavar="L:E[,E]",
                           help="experts E never selected at layer L (repeat for more layers)")
    intervene.add_argument("--force", action="append", type=_layer_experts, default=[], metavar="L:E[,E]",
                           help="experts E put into every token's selection at layer L")
    intervene.add_argument("--top-k", type=_per_layer(int), metavar="K|L:K",
                           help="experts per token: K at every MoE layer, or L:K at layer L only")
    intervene.add_argument("--bias", action="append", type=_layer_bias, default=[], metavar="L:E=V[,E=V]",
                           help="add V to expert E's router logit at layer L (steering)")
    intervene.add_argument("--capacity-factor", type=_per_layer(float), metavar="A|L:A",
                           help="each expert takes at most max(ceil(A*k*T/E), 4) tokens: at every MoE layer, or at L")
    intervene.add_argument("--policy", action="append", type=_routing_policy, default=[],
                           metavar="[L:]NAME[,KEY=VALUE]", help=(
                               "a Routing-lab policy run in the forward pass, at every MoE layer or at L: "
                               "expert-choice[,c=EXPERTS_PER_TOKEN], hash[,method=modulo|random], "
                               "bias-balancing[,gamma=0.01,chunk=16]"))
    intervene.add_argument("--continue", dest="continuation", type=_positive_int, metavar="N",
                           help="also let both models continue the text greedily for N tokens")
    _max_tokens_option(intervene, "cut the text after N tokens")
    _model_option(intervene)

    variants = _command(commands, "variants", variants_command, "compare two variants of a model on one text", (
        "Run a text through model A (--model) and model B (--model-b, default: the same model) and print, per MoE "
        "layer, how often their first-choice experts agree and how much their top-k sets overlap, then the "
        "perplexity of each and the tokens whose log-probability moved most. The two must share a tokenizer."
    ))
    variants.add_argument("text", help="the text to run")
    variants.add_argument("--model-b", metavar="PATH_OR_ID", help="model B (default: model A's source)")
    variants.add_argument("--quantization-b", choices=("auto", "none", "nf4"),
                          help="model B's weights storage (default: nf4 for model A's source, else auto)")
    _max_tokens_option(variants, "cut the text after N tokens")
    _model_option(variants)

    atlas = _command(commands, "atlas", atlas_command, "what each expert does, over a run or trace files", (
        "Per MoE layer: MaxVio, coefficient of variation, Jain's index and dead experts; per expert: its "
        "share of the layer's top-k assignments, its top tokens (with the share of each token id's "
        "occurrences routed to it, OLMoE Eq. 8) and its share of each domain (Eq. 7). A corpus run is "
        "read out of core. The special tokens of --model's tokenizer are left out."
    ))
    atlas.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                       help="a corpus run folder (from `moeviz corpus`), or trace files (.safetensors); "
                            "a trace file's domain is its file name")
    atlas.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    atlas.add_argument("--top", type=_positive_int, default=10, metavar="N",
                       help="top tokens per expert (default: %(default)s)")
    atlas.add_argument("--phase", choices=("all", "prefill", "generated"), default="all",
                       help="for traces with generated tokens: count only the prompt or only the generation")
    _model_option(atlas)
    return parser


def _command(commands, name: str, run, summary: str, description: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=summary, description=description, epilog=EXIT_STATUS)
    command.set_defaults(run=run)
    return command


# How a model is loaded: each flag defaults to its environment variable, else "auto".
LOAD_OPTIONS = {
    "quantization": ("MOEVIZ_QUANTIZATION", ("auto", "none", "nf4"),
                     ("weights storage: auto = full precision when it fits the device with 10%% to spare, else "
                      "4-bit; none = full precision; nf4 = experts, attention and embeddings in 4-bit")),
    "device": ("MOEVIZ_DEVICE", ("auto", "cpu", "cuda"), "where the model runs: auto = the GPU when there is one"),
    "dtype": ("MOEVIZ_DTYPE", ("auto", "float32", "bfloat16", "float16"),
              "full-precision and compute dtype: auto = bfloat16 on a GPU, float32 on the CPU"),
}


def _model_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", metavar="PATH_OR_ID",
                         help="a local model folder or a hub id (default: $MOEVIZ_MODEL, else the bundled model)")
    for name, (variable, choices, what) in LOAD_OPTIONS.items():
        command.add_argument(f"--{name}", choices=choices, help=f"{what} (default: ${variable}, else auto)")


def _load_options(args) -> dict[str, str]:
    """--quantization, --device and --dtype as given, else from their environment variables."""
    options = {}
    for name, (variable, choices, _) in LOAD_OPTIONS.items():
        value = getattr(args, name) or os.environ.get(variable) or "auto"
        if value not in choices:
            raise UsageError(f"${variable} is {value!r}; choose one of {', '.join(choices)}")
        options[name] = value
    return options


def _server_options(command: argparse.ArgumentParser) -> None:
    group = command.add_argument_group("serving engines", (
        "Send the text to a running vLLM or SGLang server with routing enabled instead of running the model "
        "here (see the README, \"Serving engines\"). --model then names a local folder with the served "
        "model's config.json and tokenizer; no weights are needed. The trace holds expert ids only."))
    group.add_argument("--server", metavar="URL", help="the server, e.g. http://gpu-box:8000")
    group.add_argument("--engine", choices=("vllm", "sglang"), help="which engine serves it (needed with --server)")
    group.add_argument("--concurrency", type=_positive_int, default=4, metavar="N",
                       help="requests in flight at once; a corpus sends one batch at a time (default: %(default)s)")
    group.add_argument("--retries", type=int, default=3, metavar="N",
                       help="retries of a failed request, with exponential backoff (default: %(default)s)")


def _server(args):
    """(ServedModel, ServerOptions) for --server, or None to run the model here."""
    if args.server is None:
        if args.engine is not None:
            raise UsageError("--engine only applies with --server URL")
        return None
    given = [f"--{name}" for name in LOAD_OPTIONS if getattr(args, name) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} do not apply with --server: the server loads the model")
    if args.engine is None:
        raise UsageError("--server needs --engine vllm or --engine sglang")
    if args.retries < 0:
        raise UsageError(f"--retries must be 0 or more, got {args.retries}")
    from moeviz.runs.engine_client import ServerOptions
    from moeviz.runs.engines import served_model

    folder = args.model or os.environ.get("MOEVIZ_MODEL")
    if not folder or not Path(folder).is_dir():
        raise UsageError("--server needs --model FOLDER (or $MOEVIZ_MODEL) holding the served model's "
                         "config.json and tokenizer")
    return served_model(folder), ServerOptions(args.server, args.engine, args.concurrency, args.retries)


def _max_tokens_option(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument("--max-tokens", type=_positive_int, default=MAX_TOKENS, metavar="N",
                         help=f"{what} (default: %(default)s)")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _layer_experts(value: str) -> tuple[int, list[int]]:
    """"L:E[,E]" -> (L, [E, ...])."""
    layer, _, experts = value.partition(":")
    try:
        return int(layer), [int(e) for e in experts.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER:EXPERT[,EXPERT] such as 2:5,7, got {value!r}") from None


def _layer_bias(value: str) -> tuple[int, dict[int, float]]:
    """"L:E=V[,E=V]" -> (L, {E: V})."""
    layer, _, pairs = value.partition(":")
    try:
        return int(layer), {int(e): float(v) for e, v in (pair.split("=") for pair in pairs.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER:EXPERT=VALUE[,EXPERT=VALUE] such as 2:5=1.5, got {value!r}") from None


POLICY_KEYS = {"expert choice": {"c": ("experts_per_token", float)},
               "hash": {"method": ("hash_method", str)},
               "bias balancing": {"gamma": ("update_speed", float), "chunk": ("chunk_size", int)}}


def _routing_policy(value: str):
    """"[L:]NAME[,KEY=VALUE...]" -> (L or None, RoutingPolicy)."""
    from moeviz.model.interventions import RoutingPolicy

    layer, colon, spec = value.partition(":")
    if not colon:
        layer, spec = None, value
    name, *pairs = spec.split(",")
    name = name.strip().replace("-", " ")
    if name not in POLICY_KEYS:
        raise argparse.ArgumentTypeError(f"the policy is one of {', '.join(k.replace(' ', '-') for k in POLICY_KEYS)}; "
                                         f"got {value!r}")
    options = {}
    try:
        for pair in pairs:
            key, _, number = pair.partition("=")
            field, kind = POLICY_KEYS[name][key.strip()]
            options[field] = kind(number)
        return (None if layer is None else int(layer)), RoutingPolicy(name, **options)
    except KeyError as error:
        raise argparse.ArgumentTypeError(f"{name} takes {', '.join(POLICY_KEYS[name])}; got {error.args[0]!r} in {value!r}") from None
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{value!r}: {error}") from None


def _policies(given: list):
    """--policy values -> one RoutingPolicy for every layer, {layer: RoutingPolicy}, or None."""
    if not given:
        return None
    if any(layer is None for layer, _ in given):
        if len(given) > 1:
            raise UsageError("a --policy without a layer applies at every MoE layer; give it alone")
        return given[0][1]
    return _merged(given, "--policy")


def _per_layer(kind):
    """"X" -> X for every layer, "L:X" -> {L: X}."""
    def parse(value: str):
        try:
            if ":" in value:
                layer, _, number = value.partition(":")
                return {int(layer): kind(number)}
            return kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or LAYER:{kind.__name__}, got {value!r}") from None
    return parse


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise UsageError(f"no {what} at {path}")
    return path


def _model_source(args) -> str:
    from moeviz.model.loading import BUNDLED_MODEL

    return args.model or os.environ.get("MOEVIZ_MODEL") or str(BUNDLED_MODEL)


def _load(args, plan=None):
    from moeviz.model.loading import load_model

    return load_model(_model_source(args), **_load_options(args), plan=plan)


# -- trace -----------------------------------------------------------------------------------


def trace_command(args) -> int:
    if args.generate is None and (args.temperature is not None or args.seed is not None):
        raise UsageError("--temperature and --seed only apply with --generate N")
    if args.output is not None and not args.output.parent.is_dir():
        raise UsageError(f"no folder {args.output.parent} to write {args.output.name} in")
    text = args.text
    if args.file is not None:
        try:
            text = _existing(args.file, "text file").read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{args.file} is not UTF-8 text ({error.reason} at byte {error.start})") from None

    from moeviz.api import trace_text
    from moeviz.model.generation import Sampling

    sampling = None
    if args.generate is not None:
        sampling = Sampling(max_new_tokens=args.generate, temperature=args.temperature or 0.0, seed=args.seed or 0)
    server = _server(args)
    if server is not None:
        from moeviz.runs.engine_client import trace_on_server

        if args.seed is not None:
            raise UsageError("--seed does not apply with --server")
        trace = trace_on_server(*server, text, max_tokens=args.max_tokens, max_new_tokens=args.generate or 0,
                                temperature=args.temperature or 0.0)
    else:
        trace = trace_text(_load(args), text, max_tokens=args.max_tokens, sampling=sampling)
    print(summary_table(trace))
    if args.output is not None:
        trace.save(args.output)
        print(f"Trace written to {args.output}")
    return 0


def summary_table(trace: RoutingTrace) -> str:
    """A plain-text table of a RoutingTrace, one row per MoE layer: the busiest and idlest
    expert's first-choice share against the uniform 1/E, mean router entropy, balance loss
    (balanced = k) and the share of adjacent tokens keeping their first choice, against chance."""
    uniform = 1 / trace.num_experts
    load = metrics.expert_load(trace, 1)
    scored = trace.has_scores  # a serving engine's trace has expert ids only; a scoring may be unknown
    entropy = metrics.router_entropy(trace).mean(axis=1) if scored else None
    balance = metrics.balance_loss(trace) if scored else None
    repeats = metrics.repeat_rates(trace).same_first if trace.num_tokens >= 2 else None
    header = ["layer", "top-1 max", "top-1 min", "entropy (bits)", f"balance (k={trace.top_k})", "same first"]
    rows = [
        [
            trace.layer_label(layer_id),
            f"{load[i].max():.3f} ({load[i].max() / uniform:.2f}x)",
            f"{load[i].min():.3f} ({load[i].min() / uniform:.2f}x)",
            "-" if entropy is None else f"{entropy[i]:.3f}",
            "-" if balance is None else f"{balance[i]:.3f}",
            "-" if repeats is None else f"{repeats[i]:.3f}",
        ]
        for i, layer_id in enumerate(trace.layer_ids)
    ]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    lines = [
        f"{trace.model_id} ({trace.model_type}): {trace.num_tokens} tokens, {len(trace.layer_ids)} MoE layers "
        f"of {trace.num_layers}, {trace.num_experts} experts, top-{trace.top_k}, {trace.scoring} router",
    ]
    if trace.generated:
        lines.append(f"{trace.num_tokens - trace.generated_from} of the tokens were generated")
    if trace.truncated:
        lines.append(f"The text has {trace.input_token_count} tokens; only the first {trace.num_tokens} were traced")
    if not trace.has_logits:
        lines.append(f"Expert ids only, as {trace.engine or 'a serving engine'} reported them: "
                     "entropy and balance need router logits")
    elif not scored:
        lines.append(f"Scoring unknown: moeviz could not tell how {trace.router_class or 'this router'} scores "
                     "experts, so it computes no entropy or balance from a guess")
    for row in [header, *rows]:  # layer names to the left, numbers to the right
        lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
    lines.append(
        f"top-1 shares against uniform 1/E = {uniform:.3f}; same first: adjacent tokens with the same "
        f"first-choice expert, chance {uniform:.3f}"
    )
    return "\n".join(lines)


# -- corpus ----------------------------------------------------------------------------------


def corpus_command(args) -> int:
    _existing(args.source, "corpus")
    from moeviz.runs.corpus import read_documents, run_corpus

    documents = read_documents(args.source)  # a bad corpus fails before the model loads
    server = _server(args)
    if server is not None:
        from moeviz.runs.engine_client import run_corpus_on_server

        summary = run_corpus_on_server(*server, documents, args.output, batch_size=args.batch_size,
                                       max_tokens=args.max_tokens)
    else:
        summary = run_corpus(_load(args), documents, args.output, batch_size=args.batch_size,
                             max_tokens=args.max_tokens)
    print(
        f"{summary.run_dir}: traced {summary.documents} documents ({summary.tokens} tokens) into "
        f"{summary.parts} part files; {summary.skipped} were already done"
        + (f"; {summary.truncated} were cut at {args.max_tokens} tokens" if summary.truncated else "")
    )
    return 0


# -- serve -----------------------------------------------------------------------------------


def serve_command(args) -> int:
    """Replace this process with Streamlit running the app, so that signals reach the server."""
    app = REPO / "app.py"
    if not app.is_file():
        raise ValueError(f"moeviz serve runs the app from a source checkout, and {app} is missing")
    env = dict(os.environ)
    if args.model:
        model = Path(args.model).expanduser()
        if model.exists():
            env["MOEVIZ_MODEL"] = str(model.resolve())  # the server runs from the checkout
        elif model.is_absolute() or args.model.startswith((".", "~")):
            raise UsageError(f"no model folder at {args.model}")
        else:
            env["MOEVIZ_MODEL"] = args.model  # a hub id
    for name, value in _load_options(args).items():
        env[LOAD_OPTIONS[name][0]] = value  # the app's sidebar starts from these
    command = ["streamlit", "run", str(app), "--server.address", args.address, "--server.port", str(args.port)]
    if args.team:
        env["MOEVIZ_TEAM"] = "1"
    command += _team_options(env)
    print(f"moeviz: serving on http://{args.address}:{args.port}", file=sys.stderr, flush=True)
    os.chdir(REPO)  # Streamlit reads .streamlit/config.toml from its working directory
    os.execve(sys.executable, [sys.executable, "-m", *command], env)


def _team_options(env: dict[str, str]) -> list[str]:
    """Streamlit options for team mode (none when it is off); refuses settings that cannot
    serve a team safely, before the server starts."""
    from moeviz.team import TeamSettingsError, read_settings

    try:
        settings = read_settings(env)
    except TeamSettingsError as error:
        raise UsageError(str(error)) from None
    if not settings.enabled:
        return []
    problems = settings.problems()
    if settings.access_token is None and not (REPO / ".streamlit" / "secrets.toml").is_file():
        problems.append("team mode needs $MOEVIZ_ACCESS_TOKEN or an [auth] section in .streamlit/secrets.toml")
    if problems:
        raise UsageError("; ".join(problems))
    return ["--server.maxUploadSize", str(settings.max_upload_mb)]


# -- info ------------------------------------------------------------------------------------


def info_command(args) -> int:
    from moeviz.model.loading import describe_model, estimate_memory

    options = _load_options(args)
    plan = estimate_memory(_model_source(args), device=options["device"], dtype=options["dtype"])
    rows = describe_model(_load(args, plan)).rows() | plan.rows()
    width = max(map(len, rows))
    print("\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in rows.items()))
    return 0


# -- intervene -------------------------------------------------------------------------------


def intervene_command(args) -> int:
    from moeviz.api import intervene

    changes = {
        "ablate": _merged(args.ablate, "--ablate"), "force": _merged(args.force, "--force"), "top_k": args.top_k,
        "bias": _merged(args.bias, "--bias"), "capacity_factor": args.capacity_factor,
        "policy": _policies(args.policy),
    }
    if all(value in (None, {}) for value in changes.values()):
        raise UsageError("say what to change: --ablate, --force, --top-k, --bias, --capacity-factor or --policy")
    result = intervene(_load(args), args.text, **changes, max_tokens=args.max_tokens,
                       continuation_tokens=args.continuation or 0)
    print(intervention_summary(result))
    return 0


def _merged(pairs: list, option: str) -> dict:
    merged = {}
    for layer, value in pairs:
        if layer in merged:
            raise UsageError(f"layer {layer} is given twice to {option}; list its experts once, e.g. {layer}:1,2")
        merged[layer] = value
    return merged


def intervention_summary(result) -> str:
    """A plain-text account of an InterventionResult: perplexity before and after, the routing
    change per MoE layer, the tokens whose log-probability moved most, continuations if any."""
    from moeviz.analysis import effects

    baseline, changed = result.baseline, result.changed
    lines = [f"{baseline.model_id} ({baseline.model_type}): {baseline.num_tokens} tokens; "
             + result.intervention.describe(baseline.encoder_layers)]
    if baseline.truncated:
        lines.append(f"The text has {baseline.input_token_count} tokens; only the first {baseline.num_tokens} were run")
    if baseline.num_tokens >= 2:
        before, after = effects.perplexity(result.baseline_logprobs), effects.perplexity(result.changed_logprobs)
        delta = result.changed_logprobs - result.baseline_logprobs
        lines.append(f"perplexity {before:.3f} -> {after:.3f} ({after / before - 1:+.1%}); "
                     f"mean log-prob change of the next token {delta.mean():+.4f}")
    shares = effects.experts_changed(baseline, changed)
    lines.append("tokens whose experts changed, per MoE layer:")
    lines += [f"  {baseline.layer_label(n):<8} {share:7.1%}" for n, share in zip(baseline.layer_ids, shares)]
    if baseline.num_tokens >= 2:
        lines.append("largest changes in the log-prob of the next token:")
        for t in np.argsort(-np.abs(delta), kind="stable")[:5]:
            lines.append(f"  after {baseline.tokens[t]!r:<16} next {baseline.tokens[t + 1]!r:<16} "
                         f"{result.baseline_logprobs[t]:8.3f} -> {result.changed_logprobs[t]:8.3f} ({delta[t]:+.3f})")
    if result.baseline_continuation or result.changed_continuation:
        lines.append(f"continuation before: {result.baseline_continuation!r}")
        lines.append(f"continuation after:  {result.changed_continuation!r}")
    return "\n".join(lines)


# -- variants ----------------------------------------------------------------------------------


def variants_command(args) -> int:
    from moeviz.api import compare_variants
    from moeviz.model.loading import load_model
    from moeviz.model.planning import STORAGE_NAMES

    source_b = args.model_b or _model_source(args)
    default_b = "nf4" if source_b == _model_source(args) else "auto"
    model_a = _load(args)
    model_b = load_model(source_b, **(_load_options(args) | {"quantization": args.quantization_b or default_b}))
    print(variants_summary(compare_variants(model_a, model_b, args.text, max_tokens=args.max_tokens),
                           *(f"{m.model_id} ({STORAGE_NAMES.get(m.quantization, m.quantization)})" for m in (model_a, model_b))))
    return 0


def variants_summary(comparison, name_a: str, name_b: str) -> str:
    """A plain-text account of a VariantComparison: agreement per layer, perplexities, the tokens
    whose log-probability moved most."""
    from moeviz.analysis import effects

    a = comparison.a
    lines = [f"A: {name_a}; B: {name_b}; {a.num_tokens} tokens",
             f"per MoE layer: first-choice agreement, top-{a.top_k} overlap"]
    lines += [f"  {a.layer_label(n):<8} {first:7.1%} {overlap:7.1%}"
              for n, first, overlap in zip(a.layer_ids, comparison.first_choice_agreement, comparison.topk_overlap)]
    if a.num_tokens >= 2:
        delta = comparison.delta_logprobs
        lines.append(f"perplexity A {effects.perplexity(comparison.logprobs_a):.3f}, B "
                     f"{effects.perplexity(comparison.logprobs_b):.3f}; mean log-prob change of the next token "
                     f"(B - A) {delta.mean():+.4f}")
        lines.append("largest changes in the log-prob of the next token:")
        for t in np.argsort(-np.abs(delta), kind="stable")[:5]:
            lines.append(f"  after {a.tokens[t]!r:<16} next {a.tokens[t + 1]!r:<16} {comparison.logprobs_a[t]:8.3f} -> "
                         f"{comparison.logprobs_b[t]:8.3f} ({delta[t]:+.3f})")
    return "\n".join(lines)


# -- atlas -----------------------------------------------------------------------------------


def atlas_command(args) -> int:
    import json

    from moeviz.analysis.atlas import atlas_json, counted_mask, run_atlas, special_token_ids, trace_atlas

    for path in args.inputs:
        _existing(path, "run folder or trace file")
    folders = [path for path in args.inputs if path.is_dir()]
    if folders and len(args.inputs) > 1:
        raise UsageError("give one corpus run folder, or trace files, not both")
    special = special_token_ids(args.model or os.environ.get("MOEVIZ_MODEL") or REPO / "assets" / "model")
    if folders:
        if args.phase != "all":
            raise UsageError("--phase applies to trace files; a corpus run holds no generated tokens")
        atlas = run_atlas(folders[0], excluded_token_ids=special, top=args.top, contexts=0)
    else:
        if len({path.name for path in args.inputs}) < len(args.inputs):
            raise UsageError("two trace files have the same file name; rename one")
        traces = {path.name: RoutingTrace.load(path) for path in args.inputs}
        atlas = trace_atlas(traces, {name: Path(name).stem for name in traces}, top=args.top, contexts=0,
                            counted={name: counted_mask(trace, special) for name, trace in traces.items()},
                            phase=args.phase)
    if args.json:
        print(json.dumps(atlas_json(atlas, args.top), ensure_ascii=False))
    else:
        print(atlas_table(atlas))
    return 0


def atlas_table(atlas) -> str:
    """One row per MoE layer: balance figures and the busiest expert's top tokens."""
    lines = [f"{atlas.model_id}: {sum(atlas.domains.values())} tokens counted in {len(atlas.domains)} domains, "
             f"{atlas.num_experts} experts, top-{atlas.top_k}"]
    for layer in atlas.layers:
        busiest = max(layer.experts, key=lambda card: card.count)
        tokens = " ".join(repr(t.token) for t in busiest.top_tokens[:5])
        lines.append(f"{layer.label}: MaxVio {layer.maxvio:.3f}  CV {layer.cv:.3f}  Jain {layer.jain:.3f}  "
                     f"dead {layer.dead_experts or '-'}  busiest expert {busiest.expert} "
                     f"({busiest.load_share:.1%}): {tokens}")
    return "\n".join(lines)

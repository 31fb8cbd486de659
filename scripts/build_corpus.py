"""Build the multi-domain corpus that the bundled model is trained on (DESIGN.md §3).

Eight domains, all from sources on a Debian machine or generated here:
english (fortunes + King James Bible), german / spanish / italian / russian (fortunes-de/es/it/ru),
python (the standard library's own sources), c (headers under /usr/include) and math
(generated DM-Mathematics-like questions with answers).

Documents (one fortune, one Bible chapter, one source file, one question) are split into
training and held-out sets by a hash of their text, so the split is reproducible and
identical documents always land on the same side. Outputs:
  build/corpus/<domain>.txt   training text, documents separated by DOC_SEPARATOR
  assets/samples/<domain>.txt a few thousand characters of held-out documents

Usage: python scripts/build_corpus.py
"""

import argparse
import hashlib
import os
import random
import subprocess
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from math import gcd, lcm
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORTUNE_DIR = Path("/usr/share/games/fortunes")
# The record separator never occurs in our sources; documents containing it are dropped.
DOC_SEPARATOR = "\n\x1e\n"
SAMPLE_JOINER = "\n\n"


@dataclass(frozen=True)
class CorpusConfig:
    out_dir: Path = ROOT / "build" / "corpus"
    samples_dir: Path = ROOT / "assets" / "samples"
    max_train_bytes: int = 2_000_000  # per domain: keeps domains within 2x of each other
    heldout_fraction: float = 0.03
    sample_min_chars: int = 2_000
    sample_max_chars: int = 4_000
    math_seed: int = 1234


# ---------------------------------------------------------------- Debian sources


def ensure_debian_packages(packages: list[str]) -> None:
    """Install missing Debian packages with apt-get (as root), else stop with instructions."""
    missing = [p for p in packages if not _is_installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(
            f"Missing Debian packages {missing}; install them with "
            f"`sudo apt-get install {' '.join(missing)}` and run this script again."
        )
    print(f"installing missing Debian packages with apt-get: {' '.join(missing)}")
    subprocess.run(["apt-get", "update"], check=True)
    subprocess.run(["apt-get", "install", "-y", *missing], check=True)


def _is_installed(package: str) -> bool:
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return status.returncode == 0 and status.stdout.endswith(" installed")


def fortune_files(package: str) -> list[Path]:
    """The fortune text files a package installs (no index .dat files, no links, no
    offensive `off/` sets), sorted."""
    listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True)
    paths = [Path(line) for line in listing.stdout.splitlines()]
    return sorted(
        p for p in paths
        if p.is_relative_to(FORTUNE_DIR) and p.is_file() and not p.is_symlink()
        and p.suffix != ".dat" and "off" not in p.relative_to(FORTUNE_DIR).parts
    )


def fortunes(packages: list[str]) -> Iterator[str]:
    """One document per fortune cookie (fortune files separate cookies with a `%` line)."""
    for package in packages:
        for path in fortune_files(package):
            text = path.read_text(encoding="utf-8")
            for cookie in text.split("\n%\n"):
                cookie = cookie.strip("%\n")
                if cookie.strip():
                    yield cookie


def bible_chapters() -> Iterator[str]:
    """One document per chapter of the King James Bible, read with the `bible` program."""
    out = subprocess.run(
        ["bible", "-l0", "-m", "8192", "gen1:1-rev22:21"],
        capture_output=True, text=True, check=True,
    ).stdout
    # Chapter titles ("Genesis 2") start at column 0; verses are indented.
    chapter: list[str] = []
    for line in out.splitlines():
        if line and not line[0].isspace() and chapter:
            yield "\n".join(chapter)
            chapter = []
        if line.strip():
            chapter.append(line.strip())
    yield "\n".join(chapter)


# ---------------------------------------------------------------- code


def python_sources() -> Iterator[str]:
    """One document per .py file of this interpreter's standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" not in path.parts:
            yield from _read_utf8(path)


def c_headers() -> Iterator[str]:
    """One document per C header under /usr/include (C++ library headers excluded)."""
    for path in sorted(Path("/usr/include").rglob("*.h")):
        if "c++" not in path.parts and path.is_file():
            yield from _read_utf8(path)


def _read_utf8(path: Path) -> Iterator[str]:
    # A few files are deliberately in other encodings (codec tests); skip them.
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        pass


# ---------------------------------------------------------------- math


def math_questions(seed: int) -> Iterator[str]:
    """Endless DM-Mathematics-like 'question\\nAnswer: answer' documents."""
    rng = random.Random(seed)
    while True:
        question, answer = rng.choice(MATH_GENERATORS)(rng)
        yield f"{question}\nAnswer: {answer}"


def _var(rng: random.Random) -> str:
    return rng.choice("abcdfghjklmnpqrstuvwxyz")


def _int(rng: random.Random, size: int = 100) -> int:
    return rng.choice([-1, 1, 1]) * rng.randint(1, size)


def _poly(coefs: list[int], var: str) -> str:
    """Format coefficients (highest degree first) as `3*x**2 - x + 4`."""
    terms = []
    for power, c in zip(range(len(coefs) - 1, -1, -1), coefs):
        if c == 0:
            continue
        mag = abs(c)
        body = {0: str(mag), 1: var}.get(power, f"{var}**{power}")
        if power > 0 and mag != 1:
            body = f"{mag}*{body}"
        sign = "-" if c < 0 else "+"
        terms.append(f"{sign} {body}" if terms else f"{'-' if c < 0 else ''}{body}")
    return " ".join(terms) or "0"


def q_add(rng):
    a, b = _int(rng, 9999), _int(rng, 9999)
    return rng.choice(["What is {} + {}?", "Calculate {} + {}.", "Add {} and {}."]).format(a, b), a + b


def q_sub(rng):
    a, b = _int(rng, 9999), _int(rng, 9999)
    return rng.choice(["What is {} - {}?", "Calculate {} - {}.", "Subtract {1} from {0}."]).format(a, b), a - b


def q_mul(rng):
    a, b = _int(rng, 300), _int(rng, 60)
    return rng.choice(["What is {}*{}?", "Calculate {}*{}.", "Multiply {} and {}."]).format(a, b), a * b


def q_div(rng):
    b, answer = _int(rng, 40), _int(rng, 200)
    return rng.choice(["What is {} divided by {}?", "Divide {} by {}.", "Calculate {}/{}."]).format(answer * b, b), answer


def q_linear(rng):
    x, a, b = _var(rng), _int(rng, 12), _int(rng, 50)
    answer = _int(rng, 20)
    return f"Solve {_poly([a, b], x)} = {a * answer + b} for {x}.", answer


def q_linear_both_sides(rng):
    x, answer = _var(rng), _int(rng, 15)
    a, c = _int(rng, 9), _int(rng, 9)
    if a == c:
        c += 1
    b = _int(rng, 40)
    d = a * answer + b - c * answer
    return f"Solve {_poly([a, b], x)} = {_poly([c, d], x)} for {x}.", answer


def q_evaluate(rng):
    x = _var(rng)
    f = rng.choice([name for name in "fghjklmnpqrsuvwz" if name != x])
    coefs = [_int(rng, 9) for _ in range(rng.randint(2, 4))]
    at = _int(rng, 6)
    value = sum(c * at ** p for p, c in enumerate(reversed(coefs)))
    return f"Let {f}({x}) = {_poly(coefs, x)}. What is {f}({at})?", value


def q_derivative(rng):
    x = _var(rng)
    coefs = [_int(rng, 12) for _ in range(rng.randint(2, 5))]
    degree = len(coefs) - 1
    derived = [c * (degree - i) for i, c in enumerate(coefs[:-1])]
    return f"Differentiate {_poly(coefs, x)} with respect to {x}.", _poly(derived, x)


def q_expand(rng):
    x = _var(rng)
    a, b, c, d = _int(rng, 9), _int(rng, 12), _int(rng, 9), _int(rng, 12)
    return f"Expand ({_poly([a, b], x)})*({_poly([c, d], x)}).", _poly([a * c, a * d + b * c, b * d], x)


def q_gcd(rng):
    k = rng.randint(2, 40)
    a, b = k * rng.randint(1, 60), k * rng.randint(1, 60)
    return rng.choice(["What is the greatest common divisor of {} and {}?",
                       "Calculate the highest common factor of {} and {}."]).format(a, b), gcd(a, b)


def q_lcm(rng):
    a, b = rng.randint(2, 90), rng.randint(2, 90)
    return rng.choice(["What is the least common multiple of {} and {}?",
                       "Calculate the lowest common multiple of {} and {}."]).format(a, b), lcm(a, b)


def q_remainder(rng):
    a, b = rng.randint(10, 5000), rng.randint(2, 60)
    return f"What is the remainder when {a} is divided by {b}?", a % b


def q_prime(rng):
    n = rng.randint(2, 3000)
    return rng.choice(["Is {} a prime number?", "Is {} prime?"]).format(n), _is_prime(n)


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def q_prime_factors(rng):
    n = rng.randint(4, 5000)
    factors = [p for p in range(2, n + 1) if n % p == 0 and _is_prime(p)]
    return f"List the prime factors of {n}.", ", ".join(map(str, factors))


def q_round(rng):
    digits = rng.randint(1, 3)
    value = round(rng.uniform(-100, 100), digits + rng.randint(1, 3))
    places = "1 decimal place" if digits == 1 else f"{digits} decimal places"
    return f"Round {value} to {places}.", f"{value:.{digits}f}"


def q_fraction(rng):
    a = Fraction(rng.randint(1, 12), rng.randint(2, 12))
    b = Fraction(rng.randint(1, 12), rng.randint(2, 12))
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"Calculate {a} {op} {b}.", value


def q_sequence(rng):
    start, step = _int(rng, 50), _int(rng, 15)
    terms = [start + step * i for i in range(rng.randint(3, 5))]
    return f"What is the next term in {', '.join(map(str, terms))}?", terms[-1] + step


def q_units(rng):
    big, small, factor = rng.choice([
        ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24),
        ("kilometers", "meters", 1000), ("kilograms", "grams", 1000), ("litres", "millilitres", 1000),
    ])
    amount = Fraction(rng.randint(1, 80), rng.choice([1, 2, 4, 5, 10]))
    return f"How many {small} are there in {float(amount):g} {big}?", f"{float(amount * factor):g}"


def q_compare(rng):
    a, b = Fraction(_int(rng, 30), rng.randint(1, 9)), Fraction(_int(rng, 30), rng.randint(1, 9))
    if a == b:
        b += 1
    return f"Which is bigger: {a} or {b}?", max(a, b)


MATH_GENERATORS: list[Callable[[random.Random], tuple[str, object]]] = [
    q_add, q_sub, q_mul, q_div, q_linear, q_linear_both_sides, q_evaluate, q_derivative,
    q_expand, q_gcd, q_lcm, q_remainder, q_prime, q_prime_factors, q_round, q_fraction,
    q_sequence, q_units, q_compare,
]


# ---------------------------------------------------------------- split and write


def doc_hash(doc: str) -> float:
    """A stable position in [0, 1) for a document, from the SHA-256 of its text."""
    return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") / 2**64


def split_documents(docs: Iterator[str], cfg: CorpusConfig) -> tuple[list[str], list[str]]:
    """Deduplicate, then split by hash into (train, heldout), each in hash order; the
    training list is cut once it holds `max_train_bytes`."""
    unique = {d for d in docs if DOC_SEPARATOR not in d}
    ordered = sorted(unique, key=doc_hash)
    heldout = [d for d in ordered if doc_hash(d) < cfg.heldout_fraction]
    train, size = [], 0
    for doc in ordered:
        if doc_hash(doc) >= cfg.heldout_fraction and size < cfg.max_train_bytes:
            train.append(doc)
            size += len(doc.encode("utf-8")) + len(DOC_SEPARATOR)
    return train, heldout


def heldout_sample(heldout: list[str], cfg: CorpusConfig) -> str:
    """Whole held-out documents, joined, until the sample holds at least `sample_min_chars`;
    a document that would overflow `sample_max_chars` is cut at a line end."""
    sample = ""
    for doc in heldout:
        room = cfg.sample_max_chars - len(sample) - len(SAMPLE_JOINER)
        if len(doc) > room:
            doc = doc[:room].rsplit("\n", 1)[0]
        sample = f"{sample}{SAMPLE_JOINER}{doc}" if sample else doc
        if len(sample) >= cfg.sample_min_chars:
            break
    return sample.strip() + "\n"


def domain_sources(cfg: CorpusConfig) -> dict[str, Callable[[], Iterator[str]]]:
    """Domain name -> a function yielding its documents."""
    def english():
        yield from fortunes(["fortunes", "fortunes-min"])
        yield from bible_chapters()

    def math():
        # Enough generated questions to fill the cap several times over before deduplication.
        questions = math_questions(cfg.math_seed)
        return (next(questions) for _ in range(cfg.max_train_bytes // 10))

    return {
        "english": english,
        "german": lambda: fortunes(["fortunes-de"]),
        "spanish": lambda: fortunes(["fortunes-es"]),
        "italian": lambda: fortunes(["fortunes-it"]),
        "russian": lambda: fortunes(["fortunes-ru"]),
        "python": python_sources,
        "c": c_headers,
        "math": math,
    }


def build(cfg: CorpusConfig) -> None:
    ensure_debian_packages(
        ["fortunes", "fortunes-min", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-ru",
         "bible-kjv", "bible-kjv-text"]
    )
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    cfg.samples_dir.mkdir(parents=True, exist_ok=True)
    print(f"{'domain':<8} {'train docs':>10} {'train MB':>9} {'held-out docs':>13} {'sample chars':>12}")
    for domain, source in domain_sources(cfg).items():
        train, heldout = split_documents(source(), cfg)
        if not train or not heldout:
            raise SystemExit(f"Domain {domain!r} produced no documents; is its source installed?")
        train_text = DOC_SEPARATOR.join(train)
        sample = heldout_sample(heldout, cfg)
        (cfg.out_dir / f"{domain}.txt").write_text(train_text, encoding="utf-8")
        (cfg.samples_dir / f"{domain}.txt").write_text(sample, encoding="utf-8")
        megabytes = len(train_text.encode("utf-8")) / 1e6
        print(f"{domain:<8} {len(train):>10} {megabytes:>9.2f} {len(heldout):>13} {len(sample):>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-train-bytes", type=int, default=CorpusConfig.max_train_bytes)
    args = parser.parse_args()
    build(CorpusConfig(max_train_bytes=args.max_train_bytes))


if __name__ == "__main__":
    main()

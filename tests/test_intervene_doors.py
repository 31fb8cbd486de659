"""moeviz.intervene and `moeviz intervene`: the same numbers as the library, from a notebook
and from the command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from test_cli import ENV, REPO

import moeviz
from moeviz import cli
from moeviz.analysis import effects
from moeviz.model.interventions import (
    Intervention,
    RoutingPolicy,
    greedy_continuation,
    run_intervention,
)

TEXT = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_mixtral, tokenizer):
    path = tmp_path_factory.mktemp("tiny-mixtral")
    tiny_mixtral.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_intervene_takes_a_path_or_a_model_and_tokenizer(model_dir, tiny_mixtral, tokenizer):
    expected = run_intervention(tiny_mixtral, tokenizer, TEXT, Intervention(ablate={1: [0, 3]}, top_k=1))
    from_path = moeviz.intervene(str(model_dir), TEXT, ablate={1: [0, 3]}, top_k=1)
    from_objects = moeviz.intervene(tiny_mixtral, TEXT, {1: [0, 3]}, top_k=1, tokenizer=tokenizer)
    for result in (from_path, from_objects):
        np.testing.assert_array_equal(result.changed.topk_ids, expected.changed.topk_ids)
        np.testing.assert_allclose(result.changed_logprobs, expected.changed_logprobs, rtol=1e-5)
        assert result.baseline.tokens == result.changed.tokens
        assert result.baseline_logprobs.shape == (result.baseline.num_tokens - 1,)
    assert not (np.isin(from_objects.changed.topk_ids[1], [0, 3])).any()


def test_continuations_are_the_greedy_choices(tiny_mixtral, tokenizer):
    result = moeviz.intervene(tiny_mixtral, TEXT, force={0: [1]}, tokenizer=tokenizer, continuation_tokens=3)
    # The first continued token is the likeliest after the last token: the top prediction there.
    ids = tokenizer(TEXT)["input_ids"]

    assert result.changed_continuation == greedy_continuation(tiny_mixtral, tokenizer, ids, Intervention(force={0: [1]}), 3)
    assert result.baseline_continuation == greedy_continuation(tiny_mixtral, tokenizer, ids, Intervention(), 3)


def test_cli_prints_the_summary_of_the_library_result(model_dir, tiny_mixtral, tokenizer):
    done = subprocess.run(
        [sys.executable, "-m", "moeviz", "intervene", TEXT, "--ablate", "1:0,3", "--bias", "2:4=2.5", "--model",
         str(model_dir)], check=False, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = run_intervention(tiny_mixtral, tokenizer, TEXT, Intervention(ablate={1: [0, 3]}, bias={2: {4: 2.5}}))
    out = done.stdout
    assert "ablate layer 1: 0, 3 · bias layer 2: 4 +2.5" in out
    before, after = effects.perplexity(result.baseline_logprobs), effects.perplexity(result.changed_logprobs)
    assert f"perplexity {before:.3f} -> {after:.3f}" in out
    shares = effects.experts_changed(result.baseline, result.changed)
    assert shares[0] == 0 and shares[1] > 0
    for label, share in zip(["layer 0", "layer 1", "layer 2"], shares):
        assert f"  {label:<8} {share:7.1%}" in out


def test_policies_from_python_and_the_command_line(model_dir, tiny_mixtral, tokenizer):
    """`moeviz.RoutingPolicy` through moeviz.intervene, and `--policy` spelled per layer or for all."""
    everywhere = RoutingPolicy("hash", hash_method="random")
    expected = run_intervention(tiny_mixtral, tokenizer, TEXT, Intervention(policy=everywhere))
    got = moeviz.intervene(tiny_mixtral, TEXT, policy=moeviz.RoutingPolicy("hash", hash_method="random"),
                           tokenizer=tokenizer)
    np.testing.assert_array_equal(got.changed.topk_ids, expected.changed.topk_ids)
    np.testing.assert_allclose(got.changed_logprobs, expected.changed_logprobs, rtol=1e-6)

    layered = Intervention(policy={1: RoutingPolicy("bias balancing", update_speed=0.05, chunk_size=4),
                                   2: RoutingPolicy("expert choice", experts_per_token=1.5)})
    result = run_intervention(tiny_mixtral, tokenizer, TEXT, layered)
    done = subprocess.run(
        [sys.executable, "-m", "moeviz", "intervene", TEXT, "--policy", "1:bias-balancing,gamma=0.05,chunk=4",
         "--policy", "2:expert-choice,c=1.5", "--model", str(model_dir)],
        check=False, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert ("bias balancing (γ = 0.05, every 4 tokens) at layer 1 · expert choice (c = 1.5) at layer 2"
            in done.stdout)
    after = effects.perplexity(result.changed_logprobs)
    assert f"-> {after:.3f}" in done.stdout


@pytest.mark.parametrize("args, status, message", [
    (["intervene", TEXT], 2, "say what to change"),
    (["intervene", TEXT, "--policy", "top-3"], 2, "the policy is one of expert-choice, hash, bias-balancing"),
    (["intervene", TEXT, "--policy", "hash,seed=3"], 2, "hash takes method; got 'seed'"),
    (["intervene", TEXT, "--policy", "bias-balancing,gamma=-1"], 2, "γ must be a number > 0"),
    (["intervene", TEXT, "--policy", "hash", "--policy", "1:hash"], 2, "applies at every MoE layer; give it alone"),
    (["intervene", TEXT, "--policy", "1:hash", "--ablate", "1:2"], 1, "does not combine with ablate"),
    (["intervene", TEXT, "--ablate", "1-3"], 2, "expected LAYER:EXPERT[,EXPERT] such as 2:5,7"),
    (["intervene", TEXT, "--bias", "1:3"], 2, "expected LAYER:EXPERT=VALUE"),
    (["intervene", TEXT, "--ablate", "1:3", "--ablate", "1:4"], 2, "layer 1 is given twice to --ablate"),
    (["intervene", TEXT, "--ablate", "9:3"], 1, "Layer 9 has no MoE router: this model's MoE layers are 0, 1, 2"),
])
def test_cli_mistakes(args, status, message, model_dir, capsys):
    assert cli.main([*args, "--model", str(model_dir)]) == status
    assert message in capsys.readouterr().err


def test_effects_hand_worked():
    from factories import make_trace

    # Layer 0: token 1 swaps expert 2 for 3; token 2 keeps {0, 1} with its weights reordered.
    a = make_trace([[[0, 1], [1, 2], [0, 1]]], topk_weights=[[[.6, .4], [.5, .5], [.7, .3]]], num_experts=4)
    b = make_trace([[[0, 1], [1, 3], [1, 0]]], topk_weights=[[[.6, .4], [.5, .5], [.7, .3]]], num_experts=4)
    np.testing.assert_allclose(effects.experts_changed(a, b), [1 / 3])
    np.testing.assert_allclose(effects.first_choice_agreement(a, b), [2 / 3])
    # A weight of 0 means the expert did not process the token (over capacity).
    c = make_trace([[[0, 1], [1, 2], [0, 1]]], topk_weights=[[[.6, 0], [.5, .5], [.7, .3]]], num_experts=4)
    np.testing.assert_allclose(effects.experts_changed(a, c), [1 / 3])
    assert effects.perplexity(np.log([0.5, 0.25])) == pytest.approx(np.sqrt(8))
    with pytest.raises(ValueError, match="not of the same tokens, layers and experts"):
        effects.experts_changed(a, make_trace([[[0, 1], [1, 2]]]))


def test_a_one_token_text_has_no_predictions(tiny_mixtral, tokenizer):
    result = moeviz.intervene(tiny_mixtral, "The", top_k=1, tokenizer=tokenizer)
    assert result.baseline.num_tokens == 1
    assert result.baseline_logprobs.shape == result.changed_logprobs.shape == (0,)
    assert cli.intervention_summary(result).splitlines()[1] == "tokens whose experts changed, per MoE layer:"

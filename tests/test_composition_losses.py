"""Composition-distillation losses against literal loop implementations of the paper's equations."""

from __future__ import annotations

import math
import random

import pytest
import torch

from adaface_core.errors import ConfigError
from trainer.compositions import (
    aligned_tokens,
    build_prompts,
    load_composition_pool,
    parse_compositions,
    sample_prompts,
    stack_prompts,
)
from trainer.losses_composition import (
    CompositionLossWeights,
    aligned_attention_maps,
    combine_composition_losses,
    compositional_delta_loss,
    delta_alignment_loss,
    elastic_face_preserving_loss,
    orthogonal_delta,
    prompt_delta_weights,
)

D = torch.float64  # literal references are compared tightly


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _norm(a):
    return math.sqrt(_dot(a, a))


def _cos(a, b):
    return _dot(a, b) / (_norm(a) * _norm(b))


def ref_delta(f_sc: list, f_s: list) -> list:
    """Eq. 5-6 with f(s) normalised: f(s,c) - <f(s,c), f(s)/|f(s)|> f(s)/|f(s)|, one vector."""
    u = [x / _norm(f_s) for x in f_s]
    p = _dot(f_sc, u)
    return [a - p * b for a, b in zip(f_sc, u)]


def ref_delta_loss(ss, sc, cs, cc) -> float:
    """Eq. 4 for one feature type: 1 - mean over vectors of cos(delta_subject, delta_class)."""
    cosines = []
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in ss.shape[:-1]]).reshape(-1, ss.ndim - 1):
        i = tuple(idx.tolist())
        ds = ref_delta(sc[i].tolist(), ss[i].tolist())
        dc = ref_delta(cc[i].tolist(), cs[i].tolist())
        cosines.append(_cos(ds, dc))
    return 1.0 - sum(cosines) / len(cosines)


BOS, EOS = 49406, 49407  # SD1.5's CLIP tokenizer; its padding is EOS too


def ref_prompt_weights(single_ids: list, comp_ids: list) -> list:
    """Literal reading of the reference (AdaFace-dev): ``embedding_manager.update_prompt_masks`` (mask = not BOS
    and not EOS/padding), then ``util.calc_prompt_emb_delta_loss`` (mask[0] = 0; (m_single + m_comp)^2 / 4)."""
    def mask(ids):
        return [0.0 if i == 0 or t in (BOS, EOS) else 1.0 for i, t in enumerate(ids)]
    return [(a + b) ** 2 / 4 for a, b in zip(mask(single_ids), mask(comp_ids))]


def _cos_or_zero(a, b) -> float:
    """Cosine, 0 where a vector is 0 (Δ at the prefix tokens; torch's eps does the same)."""
    n = _norm(a) * _norm(b)
    return _dot(a, b) / n if n > 1e-6 else 0.0


def ref_weighted_delta_loss(ss, sc, cs, cc, w) -> float:
    """The reference's reduction (``util.calc_ref_cosine_loss``): per sample sum(w (1 - cos)) / sum(w), mean over B."""
    per_sample = []
    for b in range(ss.shape[0]):
        terms = [(w[b, k].item(), 1.0 - _cos_or_zero(ref_delta(sc[b, k].tolist(), ss[b, k].tolist()),
                                              ref_delta(cc[b, k].tolist(), cs[b, k].tolist())))
                 for k in range(ss.shape[1]) if w[b, k] > 0]
        per_sample.append(sum(wk * lk for wk, lk in terms) / sum(wk for wk, _ in terms))
    return sum(per_sample) / len(per_sample)


# "a photo of" / "a photo of riding a horse" (ids of the real vocabulary), padded to 9 positions.
SINGLE_IDS = [BOS, 320, 1125, 539, EOS, EOS, EOS, EOS, EOS]
COMP_IDS = [BOS, 320, 1125, 539, 6765, 320, 4558, EOS, EOS]


def _prompt_quad(seed: int):
    """Prompt embeddings ``[2, 9, 5]`` as a causal encoder makes them: single and composition prompts agree up to
    the composition's first word (so Δ = 0 on BOS and 'a photo of')."""
    ss, sc, cs, cc = _quad((2, len(SINGLE_IDS), 5), seed)
    sc[:, :4], cc[:, :4] = ss[:, :4], cs[:, :4]
    return [ss, sc, cs, cc]


def _ref_example_weights() -> torch.Tensor:
    return prompt_delta_weights(torch.tensor([SINGLE_IDS] * 2), torch.tensor([COMP_IDS] * 2), [BOS, EOS])


def test_prompt_delta_weights_follow_the_reference():
    """BOS 0, single-prompt tokens 1, composition-only tokens (the single prompt's EOS position included) 1/4,
    padding 0, as the reference's mask."""
    w = _ref_example_weights()
    assert w[0].tolist() == [0.0, 1.0, 1.0, 1.0, 0.25, 0.25, 0.25, 0.0, 0.0]
    assert w[0].tolist() == ref_prompt_weights(SINGLE_IDS, COMP_IDS)


def test_weighted_prompt_delta_matches_the_reference_reduction():
    q = _prompt_quad(seed=11)
    w = _ref_example_weights()
    w[1, 5] = 0.0  # samples' weights differ: each is its own weighted mean
    assert delta_alignment_loss(*q, w).item() == pytest.approx(ref_weighted_delta_loss(*q, w), abs=1e-10)
    typed = compositional_delta_loss({"prompt": [(*q, w)]})["delta_prompt"]
    assert typed.item() == pytest.approx(delta_alignment_loss(*q, w).item(), abs=1e-12)


def test_padding_and_bos_do_not_move_the_weighted_prompt_delta():
    """Padding fills most of the 77 positions: unweighted it dominates the mean; weighted it has no say."""
    q = _prompt_quad(seed=12)
    w = _ref_example_weights()
    moved = [t.clone() for t in q]
    moved[1][:, 7:] = torch.randn(2, 2, 5, dtype=D)  # padding of the subject-composition prompt
    moved[0][:, 0] = moved[1][:, 0] = torch.randn(2, 5, dtype=D)  # BOS
    assert delta_alignment_loss(*moved, w).item() == pytest.approx(delta_alignment_loss(*q, w).item(), abs=1e-12)
    assert abs(delta_alignment_loss(*moved).item() - delta_alignment_loss(*q).item()) > 1e-3
    word = [t.clone() for t in q]
    word[1][:, 5] = torch.randn(2, 5, dtype=D)  # a composition word does count
    assert abs(delta_alignment_loss(*word, w).item() - delta_alignment_loss(*q, w).item()) > 1e-3


def ref_face_loss(qs, qc, fs, fc, mask) -> float:
    """Eq. 7-8: unscaled softmax(Q_s Q_c^T) row by row, warp, 1 - cos on masked pixels only."""
    total, count = 0.0, 0
    for b in range(qs.shape[0]):
        for i in range(qs.shape[1]):
            if mask[b, i] <= 0:
                continue
            logits = [_dot(qs[b, i].tolist(), qc[b, j].tolist()) for j in range(qc.shape[1])]
            m = max(logits)
            w = [math.exp(x - m) for x in logits]
            w = [x / sum(w) for x in w]
            warped = [sum(w[j] * fc[b, j, c].item() for j in range(fc.shape[1])) for c in range(fc.shape[2])]
            total += 1.0 - _cos(warped, fs[b, i].tolist())
            count += 1
    return total / count


def _quad(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=D) for _ in range(4)]


def test_orthogonal_delta_matches_reference_and_is_orthogonal():
    f_sc, f_s = _quad((3, 5, 7))[:2]
    d = orthogonal_delta(f_sc, f_s)
    for i in range(3):
        for j in range(5):
            assert torch.allclose(d[i, j], torch.tensor(ref_delta(f_sc[i, j].tolist(), f_s[i, j].tolist()), dtype=D))
    assert (d * f_s).sum(-1).abs().max() < 1e-10


def test_delta_loss_matches_reference():
    q = _quad((2, 6, 5), seed=1)
    assert delta_alignment_loss(*q).item() == pytest.approx(ref_delta_loss(*q), abs=1e-10)


def test_delta_loss_invariant_to_scale_of_single_features():
    ss, sc, cs, cc = _quad((2, 6, 5), seed=2)
    base = delta_alignment_loss(ss, sc, cs, cc)
    assert torch.allclose(delta_alignment_loss(ss * 3.7, sc, cs * 0.01, cc), base, atol=1e-10)


def test_delta_loss_sums_types_and_averages_layers():
    a, b, c = _quad((2, 4, 3), 3), _quad((2, 4, 3), 4), _quad((1, 9, 8), 5)
    out = compositional_delta_loss({"attn_out": [a, b], "prompt": [c]}, {"attn_out": 2.0, "prompt": 0.5})
    expect_out = (ref_delta_loss(*a) + ref_delta_loss(*b)) / 2
    assert out["delta_attn_out"].item() == pytest.approx(expect_out, abs=1e-10)
    assert out["delta"].item() == pytest.approx(2.0 * expect_out + 0.5 * ref_delta_loss(*c), abs=1e-10)


def test_delta_gradients_reach_subject_not_class():
    q = [t.requires_grad_() for t in _quad((2, 6, 5), seed=6)]
    delta_alignment_loss(*q).backward()
    assert q[0].grad is not None and q[0].grad.abs().sum() > 0
    assert q[1].grad is not None and q[1].grad.abs().sum() > 0
    assert q[2].grad is None and q[3].grad is None


def test_face_loss_matches_reference():
    qs, qc, fs, fc = _quad((2, 6, 4), seed=7)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 1]], dtype=torch.float64)
    got = elastic_face_preserving_loss(qs, qc, fs, fc, mask)
    assert got.item() == pytest.approx(ref_face_loss(qs, qc, fs, fc, mask), abs=1e-10)


def test_face_loss_zero_for_identity_matching_and_equal_features():
    n = 6
    q = (torch.eye(n, dtype=D) * 30.0).unsqueeze(0).repeat(2, 1, 1)  # Q Q^T = 900 I -> one-hot softmax
    f = torch.randn(2, n, 5, dtype=D)
    loss = elastic_face_preserving_loss(q, q, f, f.clone(), torch.ones(2, n, dtype=D))
    assert loss.abs().item() < 1e-10


def test_face_loss_ignores_unmasked_positions():
    qs, qc, fs, fc = _quad((1, 6, 4), seed=8)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]], dtype=D)
    base = elastic_face_preserving_loss(qs, qc, fs, fc, mask)
    fs2, qs2 = fs.clone(), qs.clone()
    fs2[:, mask[0] == 0] = torch.randn(3, 4, dtype=D)
    qs2[:, mask[0] == 0] = torch.randn(3, 4, dtype=D)
    assert torch.allclose(elastic_face_preserving_loss(qs2, qc, fs2, fc, mask), base, atol=1e-12)


def test_face_loss_gradients_flow_to_both_subject_branches():
    t = [x.requires_grad_() for x in _quad((1, 5, 4), seed=9)]
    elastic_face_preserving_loss(*t, torch.ones(1, 5)).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in t)


def test_face_loss_of_an_empty_mask_is_zero_and_keeps_the_graph():
    """A batch without face pixels adds nothing (and no NaN) to the loss, yet backward still runs."""
    t = [x.requires_grad_() for x in _quad((2, 5, 4), seed=10)]
    loss = elastic_face_preserving_loss(*t, torch.zeros(2, 5, dtype=D))
    loss.backward()
    assert loss.item() == 0.0
    assert all(x.grad is not None and torch.equal(x.grad, torch.zeros_like(x)) for x in t)


def test_combine_weights_and_disabled_terms():
    a = _quad((2, 4, 3), 10)
    qs, qc, fs, fc = _quad((1, 5, 4), 11)
    face = [(qs, qc, fs, fc, torch.ones(1, 5))]
    w = CompositionLossWeights(delta_attn_out=1.0, delta_attn_map=0.0, delta_prompt=0.0, face_preserve=0.25)
    out = combine_composition_losses({"attn_out": [a], "attn_map": [a]}, face, w)
    assert set(out) == {"delta_attn_out", "delta", "face_preserve", "loss"}
    expect = ref_delta_loss(*a) + 0.25 * ref_face_loss(qs, qc, fs, fc, torch.ones(1, 5))
    assert out["loss"].item() == pytest.approx(expect, abs=1e-10)


def test_pool_and_prompts(tmp_path):
    pool = load_composition_pool()
    assert len(pool) >= 300 and {"backgrounds", "objects", "clothing", "styles", "lighting"} <= set(pool.categories)
    extra = tmp_path / "mine.txt"
    extra.write_text("# mine\n[mine]\nholding a tiny teapot  # trailing comment\n\n", encoding="utf-8")
    merged = load_composition_pool([extra])
    assert "holding a tiny teapot" in merged.categories["mine"] and len(merged) == len(pool) + 1
    assert parse_compositions("a\n[x]\nb").categories == {"misc": ["a"], "x": ["b"]}
    # A BOM (Notepad's UTF-8), a '#' inside a composition and two spellings of one entry.
    extra.write_bytes("[sports]\nwearing a #10 jersey\n  # a comment\nriding a horse\nRiding a horse.\n".encode("utf-8-sig"))
    mine = load_composition_pool([extra], include_default=False)
    assert mine.categories == {"sports": ["wearing a #10 jersey", "riding a horse", "Riding a horse."]}
    assert mine.entries == ["wearing a #10 jersey", "riding a horse"]
    extra.write_text("[sports]\n{subject} surfing a wave\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"mine.txt, line 2: '\{subject\} surfing a wave' holds \{subject\}"):
        load_composition_pool([extra])

    q = build_prompts("in the forest", class_word="woman", placeholder="z")
    assert q.as_list() == [
        "a photo of z", "a photo of z in the forest", "a photo of a woman", "a photo of a woman in the forest"
    ]
    assert build_prompts("x", class_word="old man").class_single == "a photo of an old man"
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert sample_prompts(pool, ["man", None], rng=g1) == sample_prompts(pool, ["man", None], rng=g2)
    quads = sample_prompts(pool, None, batch_size=3, rng=random.Random(0))
    assert all(x.class_single == "a photo of a person" for x in quads)
    flat = stack_prompts(quads)
    assert flat[:3] == [x.subject_single for x in quads] and flat[9:] == [x.class_comp for x in quads]


def test_aligned_tokens():
    alignment = aligned_tokens(subject_start=4, subject_len=16, class_len=2, seq_len=30)
    idx = alignment.index
    assert alignment.subject[0].nonzero().flatten().tolist() == list(range(4, 20))
    assert alignment.subject[3].nonzero().flatten().tolist() == [4, 5]
    assert idx.shape == (4, 14)
    assert idx[0, :5].tolist() == [0, 1, 2, 3, 20] and idx[2, :5].tolist() == [0, 1, 2, 3, 6]


def _attention(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(dim=-1)


def test_attention_map_delta_sees_a_subject_that_takes_the_attention():
    """One head, the four prompts' maps over 12 tokens (subject / 'a <class>' at 4-6 / 4-5). Raising only the
    subject tokens' logits in the subject-composition prompt (the subject crowding out the composition, §2.3)
    scales every other column of a pixel alike: the aligned columns alone give exactly the same loss, so the
    summed subject column is what lets the attention-map delta see it."""
    g = torch.Generator().manual_seed(0)
    alignment = aligned_tokens(subject_start=4, subject_len=3, class_len=2, seq_len=12)
    logits = [torch.randn(2, 64, 12, generator=g) for _ in range(4)]

    def losses(push: float) -> tuple[float, float]:
        pushed = [x.clone() for x in logits]
        pushed[1][..., alignment.subject[1]] += push
        maps = [_attention(x) for x in pushed]
        kept = [m.index_select(-1, alignment.index[k]) for k, m in enumerate(maps)]
        return delta_alignment_loss(*kept).item(), delta_alignment_loss(*aligned_attention_maps(maps, alignment)).item()

    kept_before, with_subject_before = losses(0.0)
    kept_after, with_subject_after = losses(4.0)
    assert kept_after == pytest.approx(kept_before, abs=1e-5)
    assert with_subject_after > with_subject_before + 0.05


def test_aligned_attention_maps_add_the_subjects_summed_attention_per_sample():
    alignment = aligned_tokens(4, 3, 2, seq_len=10)
    wider = aligned_tokens(4, 3, 1, seq_len=10)
    batch = type(alignment).stack([alignment, wider])
    maps = [torch.rand(2, 5, 10) for _ in range(4)]
    out = aligned_attention_maps(maps, batch)
    assert [m.shape for m in out] == [(2, 5, 8)] * 4  # K = 7 aligned positions + the subject column
    torch.testing.assert_close(out[1][..., -1], maps[1][..., 4:7].sum(-1))
    torch.testing.assert_close(out[2][0, :, -1], maps[2][0, :, 4:6].sum(-1))
    torch.testing.assert_close(out[2][1, :, -1], maps[2][1, :, 4])
    torch.testing.assert_close(out[3][1, :, :-1], maps[3][1].index_select(-1, batch.index[1, 3]))
    on_device = aligned_attention_maps([m.to("meta") for m in maps], batch)  # the alignment stays on the host
    assert all(m.device.type == "meta" and m.shape == (2, 5, 8) for m in on_device)

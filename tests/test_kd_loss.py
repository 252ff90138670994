"""KD loss identities: k = V equals textbook KD for every tail; fixed points; α = 0 is CE; T²; gradients."""

from __future__ import annotations

import pytest
import torch

from sparsekd_core.kd_loss import TAILS, KDLoss, ce_loss


def teacher_cache(teacher_logits: torch.Tensor, k: int):
    """What `sparsekd cache` stores: top-k ids, their log-probs and the log of the mass outside them."""
    lp = torch.log_softmax(teacher_logits.double(), -1)
    top_lp, top_ids = lp.topk(k, -1)
    rest = lp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return top_ids, top_lp, rest


def textbook_kd(student_logits, teacher_logits, T):
    p = torch.softmax(teacher_logits.double() / T, -1)
    return T * T * (p * (p.log() - torch.log_softmax(student_logits.double() / T, -1))).sum(-1).mean()


def toy(B=2, L=5, V=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, L, V, generator=g, dtype=dtype) * 2
    student = (teacher + torch.randn(B, L, V, generator=g, dtype=dtype)).requires_grad_()
    ids = torch.randint(0, V, (B, L), generator=g)
    return teacher, student, ids


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("T", [1.0, 2.0, 0.7])
def test_full_vocab_equals_textbook(tail, T):
    teacher, student, ids = toy()
    out = KDLoss(alpha=1.0, temperature=T, tail=tail, chunk=2)(student, ids, *teacher_cache(teacher, teacher.shape[-1]))
    assert out.kd.item() == pytest.approx(textbook_kd(student, teacher, T).item(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("tail,T", [("topk", 1.0), ("topk", 2.0), ("bucket", 1.0), ("bucket", 2.0)])
def test_dense_model_is_a_fixed_point(tail, T):
    teacher, _, ids = toy()
    student = teacher.clone().requires_grad_()
    out = KDLoss(alpha=1.0, temperature=T, tail=tail)(student, ids, *teacher_cache(teacher, 4))
    assert abs(out.kd.item()) < 1e-12
    out.loss.backward()
    assert student.grad.abs().max().item() < 1e-12


def test_paper_tail_is_not_a_fixed_point():
    teacher, _, ids = toy()
    out = KDLoss(alpha=1.0, temperature=2.0, tail="paper")(teacher.clone(), ids, *teacher_cache(teacher, 4))
    assert out.kd.item() > 0.1


def test_alpha_zero_is_plain_ce():
    teacher, student, ids = toy()
    out = KDLoss(alpha=0.0, temperature=2.0)(student, ids, *teacher_cache(teacher, 4))
    assert out.loss.item() == pytest.approx(ce_loss(student, ids).item(), rel=1e-12)
    assert out.ce.item() == pytest.approx(out.loss.item(), rel=1e-12)


@pytest.mark.parametrize("tail", TAILS)
def test_temperature_scaling(tail):
    """kd = T²·KL(p̃‖q̃) with p̃, q̃ computed by hand from the formulas in the docstring."""
    teacher, student, ids = toy()
    cache = teacher_cache(teacher, 4)
    top_ids, top_lp, rest = cache
    z = student.detach().double()
    for T in (1.0, 1.5, 3.0):
        p = torch.softmax(top_lp / T, -1)
        zs = z.gather(-1, top_ids)
        if tail == "topk":
            logq = torch.log_softmax(zs / T, -1)
        elif tail == "paper":
            logq = torch.log_softmax(z / T, -1).gather(-1, top_ids)
        else:
            q = torch.softmax(z, -1)
            qs, qtail = q.gather(-1, top_ids), 1 - q.gather(-1, top_ids).sum(-1, keepdim=True)
            pb = torch.cat([top_lp.exp(), rest.exp()[..., None]], -1) ** (1 / T)
            qb = torch.cat([qs, qtail], -1) ** (1 / T)
            p, logq = pb / pb.sum(-1, keepdim=True), (qb / qb.sum(-1, keepdim=True)).log()
        expected = T * T * (p * (p.log() - logq)).sum(-1).mean()
        got = KDLoss(alpha=1.0, temperature=T, tail=tail)(student, ids, *cache).kd
        assert got.item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("tail", TAILS)
def test_gradient_matches_finite_differences(tail):
    teacher, student, ids = toy(B=1, L=3, V=7)
    cache = teacher_cache(teacher, 3)
    loss = KDLoss(alpha=0.5, temperature=1.7, tail=tail, chunk=2)
    assert torch.autograd.gradcheck(lambda z: loss(z, ids, *cache).loss, (student,), eps=1e-6, atol=1e-6)


def test_float32_cache_and_chunking_agree():
    teacher, student, ids = toy(V=50, L=9, dtype=torch.float32)
    top_ids, top_lp, rest = teacher_cache(teacher, 8)
    cache = (top_ids.to(torch.int32), top_lp.half(), rest.half())
    a = KDLoss(tail="bucket", chunk=1)(student, ids, *cache)
    b = KDLoss(tail="bucket", chunk=100)(student, ids, *cache)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    assert torch.isfinite(a.loss)


def reference_kd_loss(z, input_ids, top_ids, top_lp, tail_logmass, T, alpha, tail):
    """α·T²·KL + (1−α)·CE from the module docstring's formulas, in plain float64 autograd ops (no chunking,
    no custom backward): the independent reference for the fp32 gradient."""
    logq = torch.log_softmax(z, -1)
    ce = -logq[:, :-1].gather(-1, input_ids[:, 1:, None]).mean()
    if tail == "bucket":
        student_tail = logq.scatter(-1, top_ids, float("-inf")).logsumexp(-1, keepdim=True)
        teacher = torch.log_softmax(torch.cat([top_lp, tail_logmass[..., None]], -1) / T, -1)
        student = torch.log_softmax(torch.cat([logq.gather(-1, top_ids), student_tail], -1) / T, -1)
    else:
        teacher = torch.log_softmax(top_lp / T, -1)
        student = (torch.log_softmax(z.gather(-1, top_ids) / T, -1) if tail == "topk"
                   else torch.log_softmax(z / T, -1).gather(-1, top_ids))
    kd = T * T * (teacher.exp() * (teacher - student)).sum(-1).mean()
    return alpha * kd + (1 - alpha) * ce


@pytest.mark.parametrize("tail", TAILS)
def test_float32_gradient_matches_float64_reference(tail):
    """The custom backward in fp32 agrees with fp64 autograd to fp32 accuracy (relative to the gradient norm)."""
    B, L, V, k = 2, 5, 50, 8
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, L, V, generator=g) * 3
    input_ids = torch.randint(0, V, (B, L), generator=g)
    top_ids = torch.rand(B, L, V, generator=g).argsort(-1)[..., :k]  # k distinct ids per position, not the top-k
    teacher_lp = torch.log_softmax(torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2, -1)
    top_lp = teacher_lp.gather(-1, top_ids)
    tail_logmass = teacher_lp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)  # exact log(1 − Σ_S p)
    for T in (0.5, 1.0, 2.0, 4.0):
        for alpha in (0.3, 1.0):
            z32 = logits.clone().requires_grad_()
            KDLoss(alpha=alpha, temperature=T, tail=tail, chunk=2)(
                z32, input_ids, top_ids, top_lp.float(), tail_logmass.float()).loss.backward()
            z64 = logits.double().requires_grad_()
            reference_kd_loss(z64, input_ids, top_ids, top_lp, tail_logmass, T, alpha, tail).backward()
            assert z32.grad.dtype == torch.float32
            error = (z32.grad.double() - z64.grad).norm() / z64.grad.norm()
            assert error < 1e-4, (T, alpha, error.item())


# ---------------------------------------------------------------------------------------------- sampled-class teacher


def _sampled_grads(teacher, z, n, T, seeds):
    """The sampled estimator's gradient wrt the student logits, one per seed: [seeds, B, L, V]."""
    from sparsekd_core.cache import sample_classes

    input_ids = torch.zeros(z.shape[:2], dtype=torch.long)
    loss = KDLoss(alpha=1.0, temperature=T, tail="sampled")
    out = []
    for seed in range(seeds):
        ids, counts, logprobs = sample_classes(teacher, n, T, torch.Generator().manual_seed(seed))
        zz = z.clone().requires_grad_(True)
        loss(zz, input_ids, ids, logprobs, counts=counts).kd.backward()
        out.append(zz.grad)
    return torch.stack(out)


def _full_vocab_grad(teacher, z, T):
    zz = z.clone().requires_grad_(True)
    p = torch.log_softmax(teacher.double() / T, -1)
    q = torch.log_softmax(zz / T, -1)
    ((T * T) * (p.exp() * (p - q)).sum(-1).mean()).backward()
    return zz.grad


def test_sampled_kd_gradient_is_unbiased():
    """Averaged over many seeds, the sampled loss's gradient matches the full-vocabulary T²·KL gradient within its
    standard error, at every logit; the top-k loss with k < V does not (its bias is many standard errors)."""
    torch.manual_seed(0)
    B, L, V, T, n, seeds = 2, 3, 40, 2.0, 12, 3000
    teacher = torch.randn(B, L, V, dtype=torch.float64) * 3
    z = torch.randn(B, L, V, dtype=torch.float64) * 3
    grads = _sampled_grads(teacher, z, n, T, seeds)
    mean, se = grads.mean(0), grads.std(0) / seeds ** 0.5
    full = _full_vocab_grad(teacher, z, T)
    # A class too rare to be drawn in seeds·n draws (p̃ ≲ 5/(seeds·n)) has zero spread but is off by T·p̃: allow it.
    rare = T * 5.0 / (seeds * n)
    zscore = ((mean - full).abs() - rare).clamp_min(0) / (se + 1e-12)
    assert zscore.max() < 5.0, zscore.max()  # 240 logits: |z| < 5 everywhere (p ≈ 1e-4 of a false alarm)
    assert ((mean - full).abs() / (se + 1e-12) < 2.0).float().mean() > 0.9
    # The control: the top-8 loss is a biased estimate of the same gradient.
    top_lp, top_ids = torch.log_softmax(teacher, -1).topk(8, -1)
    zz = z.clone().requires_grad_(True)
    KDLoss(alpha=1.0, temperature=T, tail="topk")(zz, torch.zeros(B, L, dtype=torch.long), top_ids, top_lp,
                                                  torch.zeros(B, L)).kd.backward()
    assert ((zz.grad - full).abs() / (se + 1e-12)).max() > 20


def test_dense_model_on_its_own_sampled_cache_has_zero_expected_gradient():
    torch.manual_seed(1)
    B, L, V, T, n, seeds = 2, 3, 40, 2.0, 12, 2000
    teacher = torch.randn(B, L, V, dtype=torch.float64) * 3
    grads = _sampled_grads(teacher, teacher.clone(), n, T, seeds)
    mean, se = grads.mean(0), grads.std(0) / seeds ** 0.5
    rare = T * 5.0 / (seeds * n)
    assert ((mean.abs() - rare).clamp_min(0) / (se + 1e-12)).max() < 5.0
    assert grads[0].abs().max() > 1e-3  # one draw is noise around zero, not zero: the test can see a bias


def test_sampled_classes_are_distinct_with_counts():
    from sparsekd_core.cache import sample_classes

    logits = torch.randn(2, 5, 30) * 4
    ids, counts, logprobs = sample_classes(logits, 12, 2.0, torch.Generator().manual_seed(0))
    assert (counts.sum(-1) == 12).all()
    for i, c in zip(ids.reshape(-1, 12), counts.reshape(-1, 12)):
        used = i[c > 0]
        assert len(set(used.tolist())) == len(used) and (c[len(used):] == 0).all()  # distinct, padding last
    expected = torch.log_softmax(logits / 2.0, -1).gather(-1, ids)
    assert torch.allclose(logprobs[counts > 0], expected[counts > 0])
    again = sample_classes(logits, 12, 2.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((ids, counts, logprobs), again))  # seeded: the same draw

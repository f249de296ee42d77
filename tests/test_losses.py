import math

import pytest
import torch

from dist_tsp.losses import graph_terms, tsp_loss

T = 3.0


def softmax(row, t=1.0):
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def hand_kl(target, student, t):
    """T^2 * mean_b sum_c p_target log(p_target / p_student), by hand."""
    total = 0.0
    for tr, sr in zip(target, student):
        p, q = softmax(tr, t), softmax(sr, t)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return t * t * total / len(target)


def hand_ce(student, labels):
    return sum(-math.log(softmax(row)[y]) for row, y in zip(student, labels)) / len(labels)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 5, generator=g, dtype=torch.float64)
    teacher = torch.randn(4, 5, generator=g, dtype=torch.float64) * 2
    peers = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 4])
    return student, teacher, peers, labels


def test_each_term_matches_hand_computation(logits):
    student, teacher, peers, labels = logits
    out = tsp_loss(student, labels, teacher, peers, alpha=0.1, beta=0.8, gamma=0.1, temperature=T)
    s = student.tolist()
    assert out.ce.item() == pytest.approx(hand_ce(s, labels.tolist()), rel=1e-6)
    assert out.kd.item() == pytest.approx(hand_kl(teacher.tolist(), s, T), rel=1e-6)
    peer_sum = sum(hand_kl(p.tolist(), s, T) for p in peers)
    assert out.peer.item() == pytest.approx(peer_sum, rel=1e-6)
    assert out.total.item() == pytest.approx(0.1 * out.ce.item() + 0.8 * out.kd.item() + 0.1 * peer_sum, rel=1e-6)


def test_kl_direction_is_target_given_student(logits):
    student, teacher, peers, labels = logits
    out = tsp_loss(student, labels, teacher, peers, alpha=0, beta=1, gamma=0, temperature=T)
    reverse = hand_kl(student.tolist(), teacher.tolist(), T)
    assert out.kd.item() != pytest.approx(reverse, rel=1e-3)
    assert out.kd.item() == pytest.approx(hand_kl(teacher.tolist(), student.tolist(), T), rel=1e-6)


def test_temperature_squared_scaling(logits):
    student, teacher, peers, labels = logits
    kd = tsp_loss(student, labels, teacher, peers[:0], alpha=0, beta=1, gamma=0, temperature=4.0).kd.item()
    plain_kl_at_t4 = hand_kl(teacher.tolist(), student.tolist(), 4.0) / 4.0**2
    assert kd == pytest.approx(16 * plain_kl_at_t4, rel=1e-6)


def test_peer_mean_divides_the_sum_by_the_peer_count(logits):
    student, teacher, peers, labels = logits
    kw = dict(alpha=0.1, beta=0.8, gamma=0.1, temperature=T)
    total = tsp_loss(student, labels, teacher, peers, peer_reduction="sum", **kw).peer
    mean = tsp_loss(student, labels, teacher, peers, peer_reduction="mean", **kw).peer
    assert mean.item() == pytest.approx(total.item() / 2, rel=1e-9)


@pytest.mark.parametrize("peer_reduction", ["sum", "mean"])
def test_no_peers_gives_zero_peer_term(logits, peer_reduction):
    student, teacher, _, labels = logits
    out = tsp_loss(student, labels, teacher, torch.empty(0, 4, 5, dtype=torch.float64), alpha=1, beta=1, gamma=5,
                   temperature=T, peer_reduction=peer_reduction)
    assert out.peer.item() == 0.0
    assert out.total.item() == pytest.approx(out.ce.item() + out.kd.item(), rel=1e-6)


def test_scratch_is_plain_cross_entropy_without_a_teacher(logits):
    student, _, _, labels = logits
    out = tsp_loss(student, labels, None, torch.empty(0, 4, 5), alpha=1, beta=0, gamma=0, temperature=T)
    assert out.total.item() == pytest.approx(torch.nn.functional.cross_entropy(student, labels).item(), rel=1e-6)


def test_no_gradient_flows_into_teacher_or_peers(logits):
    student, teacher, peers, labels = (t.clone().requires_grad_(t.is_floating_point()) for t in logits)
    tsp_loss(student, labels, teacher, peers, alpha=0.1, beta=0.8, gamma=0.1, temperature=T).total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and peers.grad is None


def test_missing_teacher_with_positive_beta_is_an_error(logits):
    student, _, peers, labels = logits
    with pytest.raises(ValueError, match="teacher_logits is None but beta"):
        tsp_loss(student, labels, None, peers, alpha=0.1, beta=0.8, gamma=0.1, temperature=T)


def test_several_students_terms_equal_each_pairs_kl_weighted_by_its_share():
    g = torch.Generator().manual_seed(1)
    students, sources, teacher = torch.randn(3, 4, 5, generator=g), torch.randn(4, 4, 5, generator=g), torch.randn(
        4, 5, generator=g)
    labels, shares = torch.tensor([0, 3, 1, 4]), torch.rand(3, 4, generator=g)
    terms = graph_terms(students, labels, teacher, sources, shares, T)
    for k in range(3):
        s = students[k].tolist()
        assert terms[k, 0].item() == pytest.approx(hand_ce(s, labels.tolist()), rel=1e-5)
        assert terms[k, 1].item() == pytest.approx(hand_kl(teacher.tolist(), s, T), rel=1e-5)
        expected = sum(shares[k, j].item() * hand_kl(sources[j].tolist(), s, T) for j in range(4))
        assert terms[k, 2].item() == pytest.approx(expected, rel=1e-5)


def test_a_student_learning_from_its_own_logits_gets_a_zero_kl():
    student = torch.randn(1, 64, 1000, generator=torch.Generator().manual_seed(2)) * 5
    terms = graph_terms(student, torch.zeros(64, dtype=torch.long), student[0], student, torch.ones(1, 1), T)
    assert terms[0, 1:].abs().max().item() < 1e-5


def float64_log_softmax(logits):
    """log softmax by hand in float64: z - max - log(sum exp(z - max))."""
    shifted = logits.double() - logits.double().max(dim=-1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def float64_kl(target, student, t):
    """T^2 * mean_b sum_c p log(p / q) in float64, p = softmax(target/T), q = softmax(student/T)."""
    log_p, log_q = float64_log_softmax(target.double() / t), float64_log_softmax(student.double() / t)
    return t * t * (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean().item()


@pytest.mark.parametrize("classes", [10, 1000])
def test_kd_and_peer_terms_keep_1e_6_relative_precision_at_t10_in_float32(classes):
    """The paper's T=10: float32 logits of 4 students ~N(0, 3) and a confident teacher, batch 128. Every student's
    teacher and peer terms (the others as peers, summed) agree with a float64 computation by hand to 1e-6 relative,
    through tsp_loss and through graph_terms (the loop's fused form); float32 sums in weighted_kl give 4e-6 to 1e-5."""
    t, batch, students = 10.0, 128, 4
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(students, batch, classes, generator=g) * 3
    labels = torch.randint(0, classes, (batch,), generator=g)
    teacher = torch.randn(batch, classes, generator=g) * 2
    teacher[torch.arange(batch), labels] += 20
    assert logits.dtype == teacher.dtype == torch.float32
    fused = graph_terms(logits, labels, teacher, logits, 1 - torch.eye(students), t)
    for k in range(students):
        peers = torch.cat([logits[:k], logits[k + 1:]])
        kd = float64_kl(teacher, logits[k], t)
        peer = sum(float64_kl(p, logits[k], t) for p in peers)
        out = tsp_loss(logits[k], labels, teacher, peers, alpha=0.1, beta=0.8, gamma=0.1, temperature=t)
        assert out.kd.dtype == out.peer.dtype == torch.float32
        assert out.kd.item() == pytest.approx(kd, rel=1e-6, abs=0), (k, "kd")
        assert out.peer.item() == pytest.approx(peer, rel=1e-6, abs=0), (k, "peer")
        assert fused[k, 1].item() == pytest.approx(kd, rel=1e-6, abs=0), (k, "fused kd")
        assert fused[k, 2].item() == pytest.approx(peer, rel=1e-6, abs=0), (k, "fused peer")


def test_a_top_k_teacher_teaches_its_renormalised_top_k_distribution():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(4, 100), torch.randn(4, 100) * 3, torch.randint(0, 100, (4,))
    top = teacher.topk(10, dim=-1)
    sparse = torch.full_like(teacher, -torch.inf).scatter(1, top.indices, top.values)  # as the top-k cache reads
    t = 4.0
    kd = tsp_loss(student, labels, sparse, torch.empty(0, 4, 100), alpha=0, beta=1, gamma=0, temperature=t).kd
    p = torch.softmax(top.values.double() / t, dim=-1)  # the top 10, renormalised
    log_q = torch.log_softmax(student.double() / t, dim=-1).gather(1, top.indices)
    expected = t**2 * (p * (p.log() - log_q)).sum(-1).mean()
    assert kd.isfinite() and math.isclose(kd.item(), expected.item(), rel_tol=1e-6)


def test_bf16_logits_give_the_float32_terms_of_their_values_and_the_float32_gradient_rounded_to_bf16():
    """Under mixed_precision bf16 the models' logits are bf16: the loss casts them up before any arithmetic, so its
    terms are those of the same values in float32 (kept to 1e-6 by the test above), bitwise, and the gradient
    reaching the students' logits is the float32 one, rounded once."""
    t, batch, students, classes = 10.0, 64, 3, 10
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(students, batch, classes, generator=g) * 3).bfloat16()
    teacher = (torch.randn(batch, classes, generator=g) * 4).bfloat16()
    labels = torch.randint(0, classes, (batch,), generator=g)
    shares = 1 - torch.eye(students)
    terms, gradients = {}, {}
    for dtype in (torch.bfloat16, torch.float32):
        student = logits.to(dtype).detach().requires_grad_()
        terms[dtype] = graph_terms(student, labels, teacher.to(dtype), student.detach(), shares, t)
        terms[dtype].sum().backward()
        gradients[dtype] = student.grad
    assert terms[torch.bfloat16].dtype == torch.float32
    assert torch.equal(terms[torch.bfloat16], terms[torch.float32])
    assert gradients[torch.bfloat16].dtype == torch.bfloat16
    assert torch.equal(gradients[torch.bfloat16], gradients[torch.float32].bfloat16())

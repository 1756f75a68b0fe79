"""Objectives: LM == transformers' loss; KL is 0 against itself, > 0 otherwise, top-k = all tokens is exact;
module matching is 0 against an identical teacher; aux terms from emit_aux_loss; token normalisation."""
from __future__ import annotations

import copy

import pytest
import torch

from seqtool.arch.io import load_model
from seqtool.train.kinds import kind_modules
from seqtool.train.objectives import (AnswerLoss, AuxLoss, KLDistill, LMLoss, ModuleMatch, StepContext, _AUX_SINK,
                                      emit_aux_loss)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-qwen2", device="cpu", dtype="fp32").model


def _ctx(model, ids, teacher=None, labels=None):
    labels = ids.clone() if labels is None else labels
    out = model(input_ids=ids)
    t = teacher(input_ids=ids).logits if teacher is not None else None
    mask = labels[:, 1:] != -100
    return StepContext(ids, labels, out.logits, mask, token_scale=1.0 / int(mask.sum()), micro_scale=1.0,
                       teacher_logits=t)


def _ids():
    return torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(1))


def test_lm_loss_equals_transformers_loss_with_ignored_labels(model):
    ids = _ids()
    labels = ids.clone()
    labels[0, 10:] = -100
    ours = LMLoss()(_ctx(model, ids, labels=labels))
    ref = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_kl_is_zero_against_itself_positive_otherwise_and_top_k_all_is_exact(model):
    ids = _ids()
    with torch.no_grad():
        assert float(KLDistill(temperature=2.0)(_ctx(model, ids, teacher=model))) == pytest.approx(0.0, abs=1e-6)
        other = copy.deepcopy(model)
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ctx = _ctx(model, ids, teacher=other)
        full = KLDistill()(ctx)
        assert float(full) > 1e-4
        vocab = ctx.logits.shape[-1]
        torch.testing.assert_close(KLDistill(top_k=vocab)(ctx), full, rtol=1e-5, atol=1e-6)
        assert float(KLDistill(top_k=8)(ctx)) != pytest.approx(float(full))
        # Direct formula at T=1: mean over targets of sum p_t (log p_t - log q).
        p = ctx.teacher_logits[:, :-1].log_softmax(-1)
        q = ctx.logits[:, :-1].log_softmax(-1)
        torch.testing.assert_close(full, (p.exp() * (p - q)).sum(-1).mean(), rtol=1e-5, atol=1e-6)


def test_module_match_is_zero_for_identical_teacher_and_grows_with_difference(model):
    ids = _ids()
    names = kind_modules(model, "attention")["attention"]
    teacher = copy.deepcopy(model)
    match = ModuleMatch(names)
    match.attach(model, teacher)
    try:
        with torch.no_grad():
            assert float(match(_ctx(model, ids, teacher=teacher))) == pytest.approx(0.0, abs=1e-10)
            teacher.model.layers[0].self_attn.o_proj.weight.mul_(1.5)
            assert float(match(_ctx(model, ids, teacher=teacher))) > 1e-6
    finally:
        match.detach()
    assert not model.model.layers[0].self_attn._forward_hooks


def test_aux_loss_collects_terms_emitted_during_the_forward(model):
    layer = model.model.layers[0].mlp
    handle = layer.register_forward_hook(lambda m, i, o: emit_aux_loss("balance", o.pow(2).mean()))
    sink: list = []
    token = _AUX_SINK.set(sink)
    try:
        ctx = _ctx(model, _ids())
    finally:
        _AUX_SINK.reset(token)
        handle.remove()
    emit_aux_loss("ignored", torch.ones(()))  # outside a step: no sink, nothing happens
    ctx.aux_terms = sink
    assert [n for n, _ in sink] == ["balance"]
    value = AuxLoss(names=["balance"], fn=lambda c: torch.tensor(0.5))(ctx)
    torch.testing.assert_close(value, sink[0][1] + 0.5)
    assert float(AuxLoss(names=["other"])(ctx)) == 0.0


def test_answer_loss_is_the_mean_ce_over_answer_tokens_only(model):
    ids = _ids()
    ctx = _ctx(model, ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 5:8] = True
    mask[1, 12] = True
    ctx.batch = {"answer_mask": mask}
    logp = torch.log_softmax(ctx.logits.float(), -1)
    want = -torch.stack([logp[0, 4, ids[0, 5]], logp[0, 5, ids[0, 6]], logp[0, 6, ids[0, 7]],
                         logp[1, 11, ids[1, 12]]]).mean()
    torch.testing.assert_close(AnswerLoss()(ctx), want, rtol=1e-5, atol=1e-6)
    ctx.batch = {"answer_mask": torch.zeros_like(mask)}  # no answers: 0, still differentiable
    zero = AnswerLoss()(ctx)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_answer_kl_is_the_mean_kl_over_answer_positions_and_zero_against_itself(model):
    ids = _ids()
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(1.5)
    ctx = _ctx(model, ids, teacher=teacher)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 3:5] = True
    ctx.batch = {"answer_mask": mask}
    p = torch.log_softmax(ctx.teacher_logits.float(), -1)
    q = torch.log_softmax(ctx.logits.float(), -1)
    want = torch.stack([(p[0, t].exp() * (p[0, t] - q[0, t])).sum() for t in (2, 3)]).mean()
    obj = AnswerLoss(teacher=True)
    assert obj.name == "answer_kl" and obj.needs_teacher
    torch.testing.assert_close(obj(ctx), want, rtol=1e-5, atol=1e-6)
    ctx.teacher_logits = ctx.logits.detach()
    assert abs(float(obj(ctx).detach())) < 1e-5


def test_a_teacher_of_the_first_tokens_only_is_the_full_teacher_masked_to_them(model):
    """``Trainer(teacher_context=n)`` feeds the teacher ``ids[:, :n]``: causal, so its logits are the full-row
    teacher's first n; kl / match / answer_kl then equal the full-teacher terms restricted to those positions."""
    ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        n = 10
        full = _ctx(model, ids, teacher=teacher)
        short = _ctx(model, ids, teacher=teacher)
        short.teacher_logits = teacher(input_ids=ids[:, :n]).logits
        torch.testing.assert_close(short.teacher_logits, full.teacher_logits[:, :n], rtol=1e-5, atol=1e-5)
        masked = _ctx(model, ids, teacher=teacher)
        masked.target_mask = masked.target_mask.clone()
        masked.target_mask[:, n:] = False          # the same positions, with the row's token normalisation kept
        torch.testing.assert_close(KLDistill()(short), KLDistill()(masked), rtol=1e-5, atol=1e-6)
        assert float(KLDistill()(short)) < float(KLDistill()(full))
        answers = torch.zeros_like(ids, dtype=torch.bool)
        answers[0, 6:8] = True                      # predicted at 5, 6 (inside the teacher's span)
        answers[1, 20] = True                       # predicted at 19: beyond it, left out
        inside = answers.clone()
        inside[1, 20] = False
        short.batch, full.batch = {"answer_mask": answers}, {"answer_mask": inside}
        torch.testing.assert_close(AnswerLoss(teacher=True)(short), AnswerLoss(teacher=True)(full), rtol=1e-5,
                                   atol=1e-6)
        short.batch = {"answer_mask": torch.zeros_like(answers).index_fill_(1, torch.tensor([20]), True)}
        assert float(AnswerLoss(teacher=True)(short)) == 0.0

import json

import torch
from typer.testing import CliRunner

from seqtool.cli.app import app
from seqtool.zoo.train_ref import TrainConfig, train


def test_train_ref_cli_two_steps_and_export(tmp_path):
    run, out = tmp_path / "run", tmp_path / "ref"
    res = CliRunner().invoke(app, ["zoo", "train-ref", "--run-dir", str(run), "--tiny", "--max-steps", "2",
                                   "--export", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["steps"] == 2 and info["last_loss"]["lm"] > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert model.config.num_key_value_heads == model.config.num_attention_heads
    assert tok.bos_token and tok.eos_token and tok.pad_token
    assert "step **2**" in (out / "README.md").read_text()
    assert "train.log" not in {p.name for p in out.iterdir()}


def test_resume_gives_the_same_weights(tmp_path):
    cfg = TrainConfig.tiny()
    cfg.eval_every = 0
    cfg.phases = [[3, 640, 2]]
    train(cfg, tmp_path / "a", max_steps=3)
    # Reuse run a's tokenizer and token streams so the second run only differs by the interruption.
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b",
                    ignore=shutil.ignore_patterns("checkpoint.pt", "*.log", "run.json", "log.jsonl"))
    train(cfg, tmp_path / "b", max_steps=1)
    r = train(cfg, tmp_path / "b", max_steps=5)
    assert r.steps == 3
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["trainable"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["trainable"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_quick_eval_scores_a_right_answer_followed_by_eos(tmp_path, monkeypatch):
    """The training-time check decodes like `seqtool eval` (special tokens skipped): a model that answers
    exactly and then stops scores 1, one that answers wrong scores 0."""
    import seqtool.zoo.train_ref as tr

    cfg = TrainConfig.tiny()
    tok, _, heldout = tr.prepare_data(cfg, tmp_path)
    model = tr.build_model(cfg, tok)
    answers = {}

    def fake_generate(model, prompts, max_new, pad_id, stop_ids):
        return [answers[tuple(p)] for p in prompts]

    monkeypatch.setattr(tr, "greedy_generate", fake_generate)
    real_make = tr.make_sample

    def recording_make(*args, **kwargs):
        s = real_make(*args, **kwargs)
        answers[tuple(s.input_ids)] = s.answer_ids + [tok.eos_token_id]
        return s

    monkeypatch.setattr(tr, "make_sample", recording_make)
    assert tr.quick_eval(model, tok, heldout, "passkey", 300, 2) == 1.0
    answers.update({k: v[:-2] + [tok.eos_token_id] for k, v in answers.items()})
    recording_make_wrong = lambda *a, **k: real_make(*a, **k)  # noqa: E731
    monkeypatch.setattr(tr, "make_sample", recording_make_wrong)
    assert tr.quick_eval(model, tok, heldout, "passkey", 300, 2) == 0.0


def test_stage_two_starts_from_an_export(tmp_path):
    """--init-from loads the stage-1 export's weights and tokenizer; a bad directory is a one-line error."""
    import seqtool.zoo.train_ref as tr

    cfg = TrainConfig.tiny()
    cfg.eval_every = 0
    train(cfg, tmp_path / "s1", max_steps=1)
    export = tr.export(tmp_path / "s1", tmp_path / "s1-export")
    cfg2 = TrainConfig.tiny()
    cfg2.init_from, cfg2.eval_every = str(export), 0
    tok, _, _ = tr.prepare_data(cfg2, tmp_path / "s2")
    model = tr.build_model(cfg2, tok)
    tr._init_weights(model, cfg2)
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(export).state_dict()
    assert all(torch.equal(model.state_dict()[k], src[k].float()) for k in src)
    res = CliRunner().invoke(app, ["zoo", "train-ref", "--run-dir", str(tmp_path / "s3"), "--init-from",
                                   str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not a model directory" in res.output

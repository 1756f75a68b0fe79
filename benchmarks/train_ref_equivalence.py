"""train-ref on the engine reproduces the old private loop: the first N (20) stage-1 steps, losses and weights.

    git show 016e507:seqtool/zoo/train_ref.py > /tmp/old_train_ref.py      # the last commit with the old loop
    OMP_NUM_THREADS=1 python benchmarks/train_ref_equivalence.py 20 /tmp/old_train_ref.py

Both loops run the default stage-1 config (256 x 32 rows, bf16 autocast, 1 thread) from the same tokenizer and
token streams; the result (benchmarks/results/train_ref_equivalence.json) lists both loss curves and whether the
weights after N steps are bit-identical.
"""
import importlib.util, json, shutil, sys, time
from pathlib import Path
import torch

OLD = sys.argv[2] if len(sys.argv) > 2 else "/tmp/old_train_ref.py"
spec = importlib.util.spec_from_file_location("old_train_ref", OLD)
old = importlib.util.module_from_spec(spec)
sys.modules["old_train_ref"] = old
spec.loader.exec_module(old)
import seqtool.zoo.train_ref as new

base = Path("/tmp/seqtool-train-ref-equivalence")
od, nd = base / "old", base / "new"
N = int(sys.argv[1]) if len(sys.argv) > 1 else 20
def cfg_of(mod):
    c = mod.TrainConfig()
    c.threads, c.log_every, c.eval_every, c.ckpt_every_s = 1, 1, 0, 0.0
    return c
if not (od / "train_ids.npy").exists():
    od.mkdir(parents=True, exist_ok=True)
    old.prepare_data(cfg_of(old), od)
if not (nd / "train_ids.npy").exists():
    shutil.copytree(od, nd, ignore=shutil.ignore_patterns("ckpt.pt", "*.log", "config.json"))
t = time.time()
if not (od / "ckpt.pt").exists():
    old.train(cfg_of(old), od, max_steps=N)
print("old", time.time() - t, flush=True)
t = time.time()
if not (nd / "checkpoint.pt").exists():
    new.train(cfg_of(new), nd, max_steps=N)
print("new", time.time() - t, flush=True)
ho = torch.load(od / "ckpt.pt", weights_only=False)["history"]
hn = torch.load(nd / "checkpoint.pt", weights_only=False)["history"]
keys = ("loss_lm", "loss_answer", "loss_induction")
rows = []
for a, b in zip(ho, hn):
    rows.append({"step": a["step"], **{f"old_{k}": a.get(k) for k in keys}, **{f"new_{k}": b.get(k) for k in keys}})
# The old loop stores losses rounded to 4 decimals; the weights say whether the runs are the same.
wa = torch.load(od / "ckpt.pt", weights_only=False)["model"]
wb = torch.load(nd / "checkpoint.pt", weights_only=False)["trainable"]
same = all(torch.equal(wa[k], wb[k]) for k in wb)
worst = max(abs(r[f"old_{k}"] - b[k]) for r, b in zip(rows, hn) for k in keys)
result = {"steps": len(rows), "weights_bit_identical": same, "max_abs_loss_diff_vs_old_4_decimals": worst,
          "rows": rows}
Path(__file__).resolve().parent.joinpath("results/train_ref_equivalence.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))

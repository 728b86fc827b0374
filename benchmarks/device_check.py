"""Checks that need an accelerator, one per subcommand; ``benchmarks/device_check.sh`` runs them all.

    python benchmarks/device_check.py exactness --device cuda   # tiny Llama: fp32, bf16 weights, bf16 autocast
    python benchmarks/device_check.py trl-head --device cuda    # TRL's fused head (Triton on CUDA) vs the unfused one
    python benchmarks/device_check.py lora --device cuda        # LoRA split vs separate autograd passes
    python benchmarks/device_check.py trl-fsdp                  # under `accelerate launch` with an FSDP2 config

Each prints one JSON line per check ({"check": ..., "ok": ..., measured numbers}) and
exits 1 if any check failed. Every subcommand also runs on ``--device cpu`` (that is
how the test suite smoke-tests this file); the numbers that matter come from CUDA.
Bounds: fp32 1e-5 (as the CPU tests), bf16 5e-2 against float64 (the bf16 forward's
own rounding: 3.8e-2 measured on CPU) and 1e-2 against torch's own bf16 split.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # gradlens from this checkout; tiny models from tests/models.py

import gradlens  # noqa: E402
from models import VOCAB, sequence_logps, tiny_gpt2, tiny_llama  # noqa: E402

B, T, PROMPT = 3, 9, 4
FAILED: list[str] = []


def report(check: str, ok: bool, **numbers) -> None:
    print(json.dumps({"check": check, "ok": bool(ok), **numbers}), flush=True)
    if not ok:
        FAILED.append(check)


def batch(device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (2 * B, T), generator=g)
    ids[B:, :PROMPT] = ids[:B, :PROMPT]
    return ids.to(device)


def loss_of(lp: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ref = lp.detach() + 0.3 * torch.randn(lp.shape, generator=g, dtype=lp.dtype).to(lp.device)
    return gradlens.preference_loss(lp[:B], lp[B:], ref[:B], ref[B:], beta=0.5, method="balanced").loss


def autograd_split(model, ids, autocast=None):
    """(g_chosen, g_rejected) as float64 vectors: separate autograd passes through each group's rows."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast is not None):
        lp = sequence_logps(model, ids, PROMPT)
        (w,) = torch.autograd.grad(loss_of(lp), lp, retain_graph=True)
        parts = []
        for rows in (slice(0, B), slice(B, 2 * B)):
            grads = torch.autograd.grad(lp[rows], params, grad_outputs=w[rows], retain_graph=True, allow_unused=True)
            parts.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double() for p, g in zip(params, grads)]))
    return parts


def recorded(model, ids, autocast=None):
    rec = gradlens.GradientRecorder(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast is not None):
        lp = sequence_logps(model, ids, PROMPT)
        with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}) as cap:
            loss_of(lp).backward()
    rec.close()
    return cap


def errors(cap, gc, gr) -> dict:
    scale = (gc.norm() * gr.norm()).item()
    return {
        "chosen": abs(cap.norm("chosen") - gc.norm().item()) / gc.norm().item(),
        "rejected": abs(cap.norm("rejected") - gr.norm().item()) / gr.norm().item(),
        "dot": abs(cap.dot("chosen", "rejected") - (gc @ gr).item()) / scale,
    }


def check_exactness(device: torch.device) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    ids = batch(device)
    model = tiny_llama(torch.float32).to(device)
    gc, gr = autograd_split(model, ids)
    cap = recorded(model, ids)
    err = errors(cap, gc, gr)
    report("exactness/fp32", max(err.values()) <= 1e-5 and not cap.unattributed, device=str(device), **err, unattributed=sorted(cap.unattributed))
    for mode in ("bf16-weights", "bf16-autocast"):
        model = tiny_llama(torch.float32).to(device)
        autocast = "bf16" if mode == "bf16-autocast" else None
        if autocast is None:
            model = model.to(torch.bfloat16)
        exact = copy.deepcopy(model).to(torch.float64)
        gc, gr = autograd_split(exact, ids)
        bc, br = autograd_split(model, ids, autocast)
        cap = recorded(model, ids, autocast)
        vs64, vs_torch = errors(cap, gc, gr), errors(cap, bc, br)
        ok = max(vs64.values()) <= 5e-2 and max(vs_torch.values()) <= 1e-2 and not cap.unattributed
        report(f"exactness/{mode}", ok, device=str(device), vs_float64=vs64, vs_torch_bf16=vs_torch, unattributed=sorted(cap.unattributed))


def check_lora(device: torch.device) -> None:
    import peft

    ids = batch(device)
    for family, build, targets, saved in (("llama", tiny_llama, ["q_proj", "v_proj"], ["lm_head"]), ("gpt2", tiny_gpt2, ["c_attn"], ["ln_f"])):
        torch.manual_seed(1)
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=targets,
                                 modules_to_save=saved, fan_in_fan_out=family == "gpt2")  # fmt: skip
        model = peft.get_peft_model(build(torch.float32), config).to(device)
        gc, gr = autograd_split(model, ids)
        cap = recorded(model, ids)
        err = errors(cap, gc, gr)
        report(f"lora/{family}", max(err.values()) <= 1e-5 and not cap.unattributed, device=str(device), **err, unattributed=sorted(cap.unattributed))


def _tiny_model_dir(path: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<eos>", "<unk>"] + "a b c d e f g h i j k l m n o p".split()
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>").save_pretrained(path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=32, n_embd=16, n_layer=2, n_head=2,
                               bos_token_id=0, eos_token_id=0, pad_token_id=0)).save_pretrained(path)  # fmt: skip
    return str(path)


PAIRS = [
    {"prompt": "a b c", "chosen": " d e", "rejected": " f g h"},
    {"prompt": "b c", "chosen": " i", "rejected": " j k"},
    {"prompt": "c d e f", "chosen": " l m n", "rejected": " o"},
    {"prompt": "p", "chosen": " a a", "rejected": " b"},
]


def _trl_run(device: torch.device, work: Path, *, bf16: bool, peft_config=None, steps: int = 2) -> dict:
    import datasets
    import trl
    from transformers import AutoTokenizer

    from gradlens.integrations.trl import GradlensDPOTrainer
    from gradlens.runs import load_run

    model_dir = _tiny_model_dir(work / "model")
    args = trl.DPOConfig(output_dir=str(work / "trainer"), per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-3,
                         report_to="none", use_cpu=device.type == "cpu", bf16=bf16, max_length=16, logging_steps=1,
                         save_strategy="no", seed=0)  # fmt: skip
    torch.manual_seed(0)
    trainer = GradlensDPOTrainer(model=model_dir, args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
                                 processing_class=AutoTokenizer.from_pretrained(model_dir), gradlens_dir=work / "run",
                                 peft_config=peft_config)  # fmt: skip
    trainer.train()  # the first recorded step checks the unfused head against TRL's fused one (Triton on CUDA)
    run = load_run(work / "run")
    row = run.steps.iloc[0]
    return {
        "verified_against_fused_head": bool(trainer._gradlens_head.verified),
        "grad_norm": float(row["grad_norm"]), "trainer_grad_norm": float(trainer.state.log_history[0]["grad_norm"]),
        "unattributed": run.summary.get("unattributed_parameters"), "steps": len(run.steps),
    }  # fmt: skip


def check_trl_head(device: torch.device) -> None:
    from trl.kernels.chunked_logprob import _use_triton

    for bf16 in (False, True):
        if bf16 and device.type == "cpu":
            continue  # TRL's bf16 on CPU is not what this check is about
        with tempfile.TemporaryDirectory() as tmp:
            got = _trl_run(device, Path(tmp), bf16=bf16)
        rel = abs(got["grad_norm"] - got["trainer_grad_norm"]) / got["trainer_grad_norm"]
        ok = got["verified_against_fused_head"] and got["unattributed"] == [] and rel <= (1e-2 if bf16 else 1e-5)
        report(f"trl-head/{'bf16' if bf16 else 'fp32'}", ok, device=str(device), triton=_use_triton(device), grad_norm_vs_trainer=rel, **got)


def check_trl_fsdp() -> None:
    """Run under `accelerate launch --config_file <FSDP2 config>`: GradlensDPOTrainer on a sharded model."""
    from accelerate import PartialState

    state = PartialState()
    device = state.device
    with tempfile.TemporaryDirectory() as tmp:
        try:
            got = _trl_run(device, Path(tmp), bf16=False)
        except Exception as exc:  # report what broke, as a failed check
            report("trl-fsdp", False, device=str(device), distributed_type=str(state.distributed_type), error=f"{type(exc).__name__}: {exc}"[:500])
            return
    rel = abs(got["grad_norm"] - got["trainer_grad_norm"]) / got["trainer_grad_norm"]
    if state.is_main_process:
        report("trl-fsdp", got["unattributed"] == [] and rel <= 1e-5, device=str(device), distributed_type=str(state.distributed_type),
               grad_norm_vs_trainer=rel, **got)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check", choices=["exactness", "trl-head", "lora", "trl-fsdp"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.check == "trl-fsdp":
        check_trl_fsdp()
    else:
        device = torch.device(args.device)
        {"exactness": check_exactness, "trl-head": check_trl_head, "lora": check_lora}[args.check](device)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

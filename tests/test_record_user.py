"""`gradlens record --env user`: a local model + tokenizer built and saved by the test.

Covers the standard and conversational formats in JSONL, CSV and Parquet, the
step-0 exactness of the recorded chosen/rejected norms against an independent
computation, and TRL-style truncation.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from gradlens.cli import main

WORDS = "the a cat dog sat ran on mat fast slow good bad yes no why how what is it you me".split()
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

STANDARD = [
    {"prompt": "why is the cat", "chosen": "the cat sat on the mat", "rejected": "the dog ran"},
    {"prompt": "what is it", "chosen": "it is good", "rejected": "it is bad bad bad"},
    {"prompt": "how", "chosen": "fast", "rejected": "slow slow"},
    {"prompt": "you me", "chosen": "yes you", "rejected": "no"},
    {"prompt": "the dog", "chosen": "sat on a mat", "rejected": "ran fast on the mat"},
    {"prompt": "is it a cat", "chosen": "yes it is a cat", "rejected": "no it is a dog"},
]


def _conversation(row: dict) -> dict:
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A GPT-2 config-built model and a WordLevel tokenizer with a chat template, saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>", *CHAT_TOKENS]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("tiny-model")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=2, eos_token_id=3, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _record(model_dir, data, out, *extra):
    return main(["record", "--env", "user", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                 "--loss", "dpo", "--quiet", *extra])


def _steps(out):
    return pd.read_csv(out / "steps.csv")


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl-conversational", "csv", "parquet", "parquet-conversational"])
def test_user_env_end_to_end(model_dir, tmp_path, fmt):
    rows = [_conversation(r) for r in STANDARD] if fmt.endswith("conversational") else STANDARD
    suffix = fmt.split("-")[0]
    data = tmp_path / f"prefs.{suffix}"
    if suffix == "jsonl":
        _write_jsonl(data, rows)
    elif suffix == "csv":
        pd.DataFrame(rows).to_csv(data, index=False)
    else:
        pd.DataFrame(rows).to_parquet(data)
    out = tmp_path / "run"
    rc = _record(model_dir, data, out, "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--eval-every", "2")
    assert rc == 0
    steps = _steps(out)
    assert steps["step"].tolist() == [0, 1, 2]
    assert steps["nonfinite"].eq(0).all()
    assert math.isclose(steps.loc[0, "loss"], math.log(2), rel_tol=1e-6)  # policy == reference at step 0
    header = json.loads((out / "config.json").read_text())
    assert header["config"]["env_info"]["conversational"] is fmt.endswith("conversational")
    assert header["config"]["env_info"]["num_pairs"] == len(STANDARD)
    evals = pd.read_csv(out / "evals.csv")
    assert evals["step"].tolist() == [0, 2, 3]
    # Without --eval-data the evaluation uses training pairs: never called held-out accuracy.
    assert {"eval/train_pair_accuracy", "eval/logps/chosen", "eval/logps/rejected"} <= set(evals.columns)
    assert "eval/pref_accuracy" not in evals.columns


def _reference_norms(model_dir, rows, beta):
    """Independent of gradlens: TRL tokenisation, one forward, two autograd.grad passes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    seqs, masks = [], []
    for side in ("chosen", "rejected"):
        for r in rows:
            p = tok(r["prompt"])["input_ids"]
            c = tok(r[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(p + c)
            masks.append([0] * len(p) + [1] * len(c))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    comp = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    per_token = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None]).squeeze(2)
    logps = (per_token * comp[:, 1:]).sum(1)
    b = len(rows)
    ref = logps.detach()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss(lc, lr):
        u = beta * ((lc - ref[:b]) - (lr - ref[b:]))
        return -torch.nn.functional.logsigmoid(u).mean()

    g_c = torch.autograd.grad(loss(logps[:b], logps[b:].detach()), params, retain_graph=True)
    g_r = torch.autograd.grad(loss(logps[:b].detach(), logps[b:]), params)
    norm = lambda gs: math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs))  # noqa: E731
    return norm(g_c), norm(g_r)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_step0_norms_match_independent_reference(model_dir, tmp_path, grad_accum):
    batch = 5
    data = _write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    out = tmp_path / "run"
    rc = _record(model_dir, data, out, "--no-shuffle", "--steps", "1", "--batch-size", str(batch),
                 "--grad-accum", str(grad_accum), "--beta", "0.1", "--dtype", "float32", "--device", "cpu")
    assert rc == 0
    row = _steps(out).iloc[0]
    want_c, want_r = _reference_norms(model_dir, STANDARD[:batch], beta=0.1)
    assert abs(row["grad_norm/chosen"] - want_c) <= 1e-5 * want_c
    assert abs(row["grad_norm/rejected"] - want_r) <= 1e-5 * want_r
    identity = row["grad_norm/chosen"] ** 2 + row["grad_norm/rejected"] ** 2 + 2 * row["grad/dot"]
    assert math.isclose(identity, row["grad_norm"] ** 2, rel_tol=1e-5)


def test_long_pairs_are_truncated_the_trl_way(model_dir, tmp_path):
    rows = STANDARD + [{"prompt": "the cat", "chosen": "yes " * 30 + "good", "rejected": "no " * 30 + "bad"}]
    data = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"1 pair\(s\) were longer than --max-length 12 tokens and were truncated"):
        assert _record(model_dir, data, out, "--steps", "1", "--batch-size", "2", "--max-length", "12") == 0
    info = json.loads((out / "config.json").read_text())["config"]["env_info"]
    assert info["pairs_truncated"] == 1 and info["num_pairs"] == len(rows)


def test_prompt_longer_than_max_length_is_refused(model_dir, tmp_path, capsys):
    rows = STANDARD + [{"prompt": "the cat sat on the mat " * 3, "chosen": "yes", "rejected": "no"}]
    data = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "run"
    assert _record(model_dir, data, out, "--max-length", "12") == 2
    err = capsys.readouterr().err
    assert f"{data}: line 7: the prompt alone has 19 tokens, at least --max-length 12" in err
    assert not out.exists()


def test_identical_pairs_are_skipped_with_a_count(model_dir, tmp_path):
    rows = STANDARD[:3] + [{"prompt": "why", "chosen": "yes", "rejected": "yes"}] + STANDARD[3:] + [{"prompt": "a", "chosen": "no", "rejected": "no"}]
    data = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"skipped 2 pair\(s\) whose chosen equals rejected \(line 4, line 8\)"):
        assert _record(model_dir, data, out, "--steps", "1", "--batch-size", "2") == 0
    info = json.loads((out / "config.json").read_text())["config"]["env_info"]
    assert info["data_rows_skipped_identical"] == 2 and info["num_pairs"] == len(STANDARD)


def test_eval_data_file_is_used_for_evaluations(model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "prefs.jsonl", STANDARD)
    heldout = _write_jsonl(tmp_path / "heldout.jsonl", STANDARD[:2])
    out = tmp_path / "run"
    assert _record(model_dir, data, out, "--eval-data", str(heldout), "--steps", "1", "--batch-size", "2") == 0
    info = json.loads((out / "config.json").read_text())["config"]["env_info"]
    assert info["eval_source"] == str(heldout)
    assert set(pd.read_csv(out / "evals.csv")["eval/pref_accuracy"]) <= {0.0, 0.5, 1.0}  # two held-out pairs

"""The model card (``README.md``) of every export, generated from the run record: what was done,
with which data, what it measured (with intervals), and how to load it."""

from __future__ import annotations

__all__ = ["CARD_FILE", "model_card"]

CARD_FILE = "README.md"

_METHODS = {
    "rtn": "round to nearest (no calibration data)",
    "omniquant": "OmniQuant-style block-wise learnable weight clipping + learnable equivalent transformation, "
                 "trained to reconstruct each block's full-precision output",
    "realign": "Q-realign: block-wise learnable clipping and smoothing trained so that benign prompts reconstruct "
               "the full-precision model and malicious prompts move back to the safe side",
    "aaq": "AAQ (alignment-aware quantization): rotation, smoothing and clipping trained end to end with a "
           "contrastive top-K KL (towards the instruct model, away from its pre-trained base)",
    "gptq": "GPTQ (llm-compressor)", "awq": "AWQ (llm-compressor)", "smoothquant+gptq": "SmoothQuant + GPTQ (llm-compressor)",
}


def _metric_rows(results: dict) -> list[str]:
    rows = []
    for suite, res in results.items():
        for key, label in (("harmful_rate", "harmful rate"), ("refusal_rate", "over-refusal"),
                           ("accuracy", "accuracy"), ("perplexity", "perplexity")):
            if key in res and res[key] is not None:
                ci = res.get("ci95")
                ci_s = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "—"
                n = res.get("n", res.get("tokens_scored", ""))
                rows.append(f"| {suite} | {label} | {res[key]:.3f} | {ci_s} | {n} |")
                break
    return rows


def model_card(record: dict, recipe_yaml: str) -> str:
    """Markdown model card of a finished run (``record`` = the run record written beside it)."""
    rec, ex, v = record.get("recipe", {}), record.get("export", {}), record.get("verify", {})
    method, scheme = rec.get("method", "?"), record.get("scheme", {}).get("name", rec.get("scheme", "?"))
    fake = bool(ex.get("fake_quant"))
    bpw = ex.get("bits_per_weight")
    lines = [f"# {scheme.upper()} {method} quantization of `{record.get('model')}`", "",
             f"Made with safeptq {record.get('safeptq_version', '')}: {_METHODS.get(method, method)}.", "",
             "| | |", "|---|---|",
             f"| source model | `{record.get('model')}` |",
             f"| method | {method} |",
             f"| scheme | {scheme} |",
             f"| format | {ex.get('format')}{' (dense fake-quant, not a serving format)' if fake else ''} |",
             f"| bits per weight | {'—' if bpw is None else f'{bpw:.2f}'} |",
             f"| calibration data | {record.get('calib_set') or 'none'} |",
             f"| reload check | weights-only logits max rel. error {v.get('weights_only_max_rel_err', float('nan')):.2g} "
             f"(tolerance {v.get('tolerance', '—')}) |",
             f"| wall time | {record.get('wall_time_s')} s, peak RSS {record.get('peak_rss_mb')} MiB |", ""]
    results = record.get("eval") or {}
    if results:
        lines += ["## Evaluation", "", "95% intervals; n = prompts (or tokens scored for perplexity).", "",
                  "| suite | metric | value | 95% CI | n |", "|---|---|---|---|---|", *_metric_rows(results), ""]
    else:
        lines += ["## Evaluation", "", "Not evaluated in this run: `safeptq eval --model THIS_FOLDER --suite "
                  "advbench:eval,alpaca:eval,wikitext2`.", ""]
    lines += ["## How to load it", "", "transformers:", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\")",
              "tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\")", "```", ""]
    if fake:
        lines += ["This is a **fake-quant** export: every quantized weight is stored dequantized in the model's "
                  "float dtype (no smaller than the original), because the scheme has no serving format in "
                  "compressed-tensors. Activation and KV-cache quantization are not stored: transformers and vLLM "
                  "run it without them. `safeptq eval --model THIS_FOLDER` re-applies them from "
                  "`safeptq_quant.json`, so its numbers are the quantized model's.", ""]
        tf = record.get("transforms") or {}
        if tf.get("online_hadamard"):
            lines += ["It also needs a **run-time op**: every `mlp.down_proj` input is multiplied by an orthogonal "
                      "Hadamard-like matrix (`x @ H.T`, stored in `safeptq_online.safetensors` under the layer's "
                      "name; the weights already hold `W @ H.T`). `safeptq eval` and `safeptq.load_model` apply it; "
                      "plain transformers does not, and without it the outputs are wrong.", ""]
        if tf.get("qk_hadamard"):
            lines += ["Its attention has a **run-time q/k transform**: after RoPE every head's query and key are "
                      "multiplied by an orthogonal matrix (`NAME.qk` in `safeptq_online.safetensors`; q·kᵀ is "
                      "unchanged) and the KV-cache quantization acts on K there. `safeptq eval` and "
                      "`safeptq.load_model` apply it; without it the model is the same up to that K quantization.", ""]
    else:
        lines += ["vLLM (compressed-tensors is read natively):", "", "```python", "from vllm import LLM",
                  "llm = LLM(model=\"THIS_FOLDER\")", "```", ""]
    lines += ["## Recipe", "", "Replay with `safeptq run THIS_FOLDER/recipe.yaml --out NEW_FOLDER`.", "",
              "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)

"""AAQ (Alignment-Aware Quantization): quantize an instruction-tuned model end to end so that its
next-token distribution stays close to the instruct model's and away from the pre-trained base's.

Two phases on the end-to-end engine (:mod:`safeptq.quant.e2e`):

1. references: the top-K log-probabilities of the instruct model (the model, in full precision,
   before it is touched) and of the base model on every calibration token, computed once into a
   :class:`~safeptq.objectives.ReferenceCache` (``references.path``, else
   ``$SAFEPTQ_HOME/references/``, keyed by the models' content, the calibration tokens and K);
   ``references.mode live`` keeps both models resident instead, to compare memory;
2. training: rotation + smoothing + learnable clipping trained jointly on the objective, folded
   into the weights; weights then rounded by GPTQ on the folded model (the authors' code) or to
   nearest with the learned clipping (``training.weights rtn``, the default for KV-cache schemes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from ..errors import ConfigError, ModelError
from .base import Calibrated, Method, RunOptions, Session

__all__ = ["AAQ", "FOLDED"]

log = logging.getLogger(__name__)

FOLDED = "folded"  # work sub-folder: the trained, folded full-precision model that weights=gptq rounds


class AAQ(Method):
    name = "aaq"
    help = "AAQ: rotation + smoothing + clipping end to end, contrastive top-K KL (to instruct, away from base)"
    run_file = "aaq.json"
    work_files = ("e2e_state.pt", "e2e_state.pt.tmp")
    work_trees = (FOLDED,)
    measure_calibration_phase = False  # calibrate() records references / search / training / gptq phases

    def uses_work(self, recipe) -> bool:
        return True

    def requires_work(self, recipe) -> bool:
        return recipe.training.weights == "gptq"  # the folded model is saved there for llm-compressor

    def check(self, recipe, options: RunOptions) -> None:
        t = recipe.training
        for flag, on in (("--online-hadamard", t.online_hadamard), ("--qk-hadamard", t.qk_hadamard)):
            if not on:
                continue
            from ..export.compressed_tensors import serving_format

            fmt = serving_format(recipe.resolved_scheme())
            if fmt.served:
                raise ConfigError(f"{flag} needs a run-time op that a {fmt.format} checkpoint cannot carry "
                                  "and vLLM would not run; use a fake-quant scheme (w4a8, w4a4, w4a4kv4)")
            if t.weights == "gptq" or (t.weights == "auto" and recipe.resolved_scheme().kv_cache is None):
                raise ConfigError(f"{flag} is not supported with GPTQ weights (llm-compressor's exporter "
                                  "does not store the run-time op); add --weights rtn")
        if recipe.training.weights == "gptq":
            from ..baselines import llmcompressor as lc

            lc.require_llmcompressor()
            lc.build_recipe("gptq", recipe.resolved_scheme())  # refuses KV schemes

    def check_family(self, recipe, family) -> None:
        if not family.rotation_ok and recipe.training.rotation == "on":
            family.check_rotation()  # asked for explicitly: refused with the reason

    @staticmethod
    def checkpointing(options: RunOptions, device) -> bool:
        return options.checkpointing == "on" or (options.checkpointing == "auto" and device.type == "cuda")

    def plan(self, recipe, options, shape, device, dtype):
        from ..plan import plan_end_to_end
        from ..quant.precision import resolve_precision

        scheme, t = recipe.resolved_scheme(), recipe.training
        return plan_end_to_end(shape, dtype=dtype, device=str(device), nsamples=recipe.calib.nsamples,
                               seqlen=recipe.calib.seqlen + recipe.calib.replies, batch_size=t.batch_size,
                               steps=t.steps, weight_bits=scheme.weights.num_bits if scheme.weights else 16,
                               precision=resolve_precision(recipe.precision, device),
                               checkpointing=self.checkpointing(options, device), topk=recipe.objective.topk,
                               n_references=2 if recipe.base else 1)

    def check_models(self, s: Session) -> None:
        """The base model must score the same tokens: same logit width and the same tokenizer."""
        base = s.recipe.base
        if not base:
            return
        from transformers import AutoConfig

        from ..models import load_tokenizer, resolve_model

        path, gguf = resolve_model(base)
        try:
            cfg = AutoConfig.from_pretrained(path, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read the config of `base` {base}: {str(e).splitlines()[0]}") from e
        va, vb = s.lm.model.config.vocab_size, getattr(cfg, "vocab_size", None)
        if va != vb:
            raise ConfigError(f"`base` {base} has a vocabulary of {vb} tokens but `model` {s.model_label} has {va}; "
                              "AAQ compares the two next-token distributions token by token, so the base must "
                              "share the instruct model's tokenizer")
        ta, tb = s.lm.tokenizer, load_tokenizer(base)
        ids_a = {i: t for t, i in ta.get_vocab().items()}
        ids_b = {i: t for t, i in tb.get_vocab().items()}
        added = set(ta.get_added_vocab()) | set(tb.get_added_vocab())
        differ = [i for i in ids_a.keys() & ids_b.keys() if ids_a[i] != ids_b[i]]
        plain = [i for i in differ if ids_a[i] not in added and ids_b[i] not in added]
        if plain:
            i = min(plain)
            raise ConfigError(f"`base` {base} uses a different tokenizer than `model` {s.model_label}: "
                              f"{len(plain)} token ids mean other tokens (id {i} is {ids_a[i]!r} vs {ids_b[i]!r})")
        if differ:
            log.warning("base and model differ in %d added/special tokens; the comparison is token-id based",
                        len(differ))

    @staticmethod
    def make_objective(recipe):
        from ..objectives import ContrastiveKLTop, KLTop

        o = recipe.objective
        if o.kind == "kl_top":
            return KLTop(k=o.topk, teacher="instruct", tail=o.tail)
        return ContrastiveKLTop(k=o.topk, lam=o.lam, push=o.push, tau=o.tau, tail=o.tail)

    def notes(self, s: Session) -> list[str]:
        from ..data.calib import parse_calib_spec

        notes = []
        if s.scheme.kv_cache is not None and not s.recipe.training.qk_hadamard:
            notes.append("KV cache: K is quantized at the k_proj output, before RoPE (an approximation of a runtime "
                         "that quantizes the rotated K; --qk-hadamard quantizes it after RoPE), V exactly; the dense "
                         "export does not store it")
        calib = {name for name, _ in parse_calib_spec(s.recipe.calib.data)}
        wiki_cal = {"wikitext2", "wikitext2:calib"} & calib
        wiki_eval = {"wikitext2", "wikitext2:lines"} & set(s.recipe.eval.suites)
        if wiki_cal and wiki_eval:
            notes.append(f"calibration ({', '.join(sorted(wiki_cal))}) and the evaluation ({', '.join(sorted(wiki_eval))}) "
                         "read the same WikiText-2 test text, so the perplexity is optimistic (wikitext2:calib is "
                         "the second half: capped perplexity windows that stay in the first half avoid it)")
        if s.recipe.training.weights == "gptq":
            notes.append("weights rounded by GPTQ on the folded model (the authors' pipeline): the learned clipping "
                         "is not used; training shapes the rotation and smoothing only")
        return notes

    def calibrate(self, s: Session) -> Calibrated:
        from ..archs import spec_of_model
        from ..memory import phase_peak
        from ..quant.e2e import E2EConfig, calibrate_end_to_end, choose_transforms
        from ..quant.smoothing import DEFAULT_PAIRS
        from ..quant.precision import resolve_precision

        r, t, lm = s.recipe, s.recipe.training, s.lm
        objective = self.make_objective(r)
        cfg = E2EConfig(scheme=s.scheme, steps=t.steps, batch_size=t.batch_size, lr_rotation=t.lr_rotation,
                        lr_smoothing=t.lr_smoothing, lr_lwc=t.lr_lwc, rotation=t.rotation != "off",
                        online_hadamard=t.online_hadamard, smoothing=t.smoothing != "off", smooth_alpha=t.smooth_alpha,
                        smooth_pairs=DEFAULT_PAIRS + (("up_down",) if t.up_down else ()), vo_rotation=t.vo_rotation,
                        qk_hadamard=t.qk_hadamard,
                        lwc=t.lwc, save_every=s.options.save_every, seed=r.seed, device=str(s.device),
                        precision=resolve_precision(r.precision, s.device),
                        checkpointing=self.checkpointing(s.options, s.device))
        notes = self.notes(s)
        for n in notes:
            log.warning("%s", n)
        log.info("AAQ %s on %d calibration samples: %s", s.scheme.name, len(s.calib), r.objective.formula())

        t_ref = time.time()
        with phase_peak() as ref_mem:
            refs, ref_info = self._references(s, objective.references)
        phases = {"references": {"wall_time_s": round(time.time() - t_ref, 2), **ref_mem.as_dict()}}
        init_search = None
        family = spec_of_model(lm.model)
        rotation_choices = (False, True) if t.rotation == "auto" else (t.rotation == "on",)
        if not family.rotation_ok and t.rotation == "auto":
            rotation_choices = (False,)
            note = f"rotation off on {family.family}: {family.not_equivalent['rotation']}"
            log.warning("%s", note)
            notes.append(note)
            cfg.rotation = False
        if "auto" in (t.rotation, t.smoothing):
            t_init = time.time()
            with phase_peak() as search_mem:
                cfg, init_search = choose_transforms(
                    lm.model, s.calib, objective, refs, cfg, rotation=rotation_choices,
                    smoothing=(False, True) if t.smoothing == "auto" else (t.smoothing == "on",))
            phases["transform_search"] = {"wall_time_s": round(time.time() - t_init, 2), **search_mem.as_dict()}
            log.info("transform search (initial KL to the instruct model, first batch): %s -> rotation %s, "
                     "smoothing %s", ", ".join(
                         f"rot {'on' if x['rotation'] else 'off'}/smooth {'on' if x['smoothing'] else 'off'} "
                         f"{x['initial_kl']:.4g}" for x in init_search),
                     "on" if cfg.rotation else "off", "on" if cfg.smoothing else "off")
        if t.weights == "gptq" and not cfg.rotation and not cfg.smoothing:
            note = ("rotation and smoothing are both off and GPTQ discards the learned clipping: the training steps "
                    "change nothing in the exported model (use training.weights rtn to keep the clipping, or turn "
                    "a transform on)")
            log.warning("%s", note)
            notes.append(note)
        t_train = time.time()
        with phase_peak() as train_mem:
            res = calibrate_end_to_end(lm.model, s.calib, objective, refs, cfg, work_dir=s.work_path,
                                       resume=s.options.resume, progress=s.progress,
                                       finalize=t.weights == "rtn", model_id=s.model_id)
        phases["training"] = {"wall_time_s": round(time.time() - t_train, 2), **train_mem.as_dict()}
        del refs  # live reference models go now

        model, method = lm.model, "aaq"
        if t.weights == "gptq":
            t_gptq = time.time()
            with phase_peak() as gptq_mem:
                model = self._gptq_weights(s)
            phases["gptq"] = {"wall_time_s": round(time.time() - t_gptq, 2), **gptq_mem.as_dict()}
            method = "aaq+llmcompressor:gptq"  # the llm-compressor exporter and reload check
        s.phases.update(phases)
        report = {"method": method, "qparams": res.qparams, **res.summary(), "objective": objective.describe()}
        record = {
            "formula": r.objective.formula(),
            "transforms": {"rotation": cfg.rotation, "online_hadamard": cfg.use_online_hadamard,
                           "smoothing": cfg.smoothing, "smooth_pairs": list(cfg.smooth_pairs) if cfg.smoothing else [],
                           "vo_rotation": sorted(int(i) for i in res.head_rotation_layers) if cfg.vo_rotation else [],
                           "qk_hadamard": cfg.qk_hadamard,
                           "lwc": cfg.lwc},
            "precision": cfg.precision, "checkpointing": cfg.checkpointing,
            "references": ref_info, "phases": phases, "transform_search": init_search,
            "loss": {"start": res.loss_start, "end": res.loss_end,
                     "terms_start": _terms(res.terms_start), "terms_end": _terms(res.terms_end),
                     "measured_on": "the first training batch, before the first step and after the last",
                     "per_step": [_terms(x, keep=("step", "seconds")) for x in res.records]},
            "notes": notes,
        }
        return Calibrated(model=model, report=report, config=cfg.fingerprint(), record=record)

    @staticmethod
    def _gptq_weights(s: Session):
        """GPTQ the trained model: unwrap it to plain full-precision linears (transforms already
        folded), save it in the work folder (llm-compressor re-reads the config from disk, and the
        rotation untied the embeddings), and run llm-compressor's GPTQ on the calibration tokens."""
        from ..baselines.llmcompressor import run_llmcompressor
        from ..models import save_model
        from ..quant.qlinear import set_quantizers_enabled, unwrap_decoder_layer
        from ..quant.rotation import decoder_parts

        model, tok, calib = s.lm.model, s.lm.tokenizer, s.calib
        set_quantizers_enabled(model, False)
        for layer in decoder_parts(model)[1]:
            unwrap_decoder_layer(layer, fold=True)  # quantizers off: the folded full-precision weights
        folded = save_model(model, tok, s.work_path / FOLDED)
        ids = calib.token_lists()
        # the folder stays until the export (llm-compressor reads it again when saving)
        return run_llmcompressor(str(folded), tok, "gptq", s.scheme, ids, nsamples=len(ids),
                                 seqlen=int(calib.input_ids.shape[1]))

    def _references(self, s: Session, names: tuple[str, ...]):
        """The references the objective reads, and what the run record says about them."""
        import copy
        import gc

        import torch

        from ..identity import model_identity
        from ..models import load_model, resolve_model
        from ..objectives import LiveReferences, ReferenceCache
        from ..objectives.references import calib_digest
        from ..paths import safeptq_home

        r, lm, device, k = s.recipe, s.lm, s.device, s.recipe.objective.topk
        ids = {"instruct": s.model_id}
        if "base" in names:
            ids["base"] = model_identity(resolve_model(r.base)[0])

        def base_model():
            return load_model(r.base, dtype=s.dtype, device=str(device)).model

        if r.references.mode == "live":
            models = {"instruct": copy.deepcopy(lm.model).to(device)}
            if "base" in names:
                models["base"] = base_model()
            return LiveReferences(models, k, model_ids=ids), {"mode": "live", "k": k, "models": ids}

        if r.references.path:
            path, explicit = Path(r.references.path).expanduser(), True
        else:
            key = hashlib.sha256(json.dumps({"models": ids, "calib": calib_digest(s.calib), "k": k},
                                            sort_keys=True).encode()).hexdigest()[:16]
            path, explicit = safeptq_home() / "references" / f"top{k}-{key}.pt", False
        t0 = time.time()
        cache = None
        if path.is_file():
            try:
                cache = ReferenceCache.load(path, s.calib, k, ids)
            except Exception as e:  # noqa: BLE001 - ours to rebuild; a user's file is refused
                if explicit:
                    raise
                log.warning("rebuilding the reference cache %s (%s)", path, e)
        reused = cache is not None
        if cache is None:
            lm.model.to(device)
            models = {"instruct": lm.model}
            if "base" in names:
                models["base"] = base_model()
            cache = ReferenceCache.build(models, s.calib, k, model_ids=ids, batch_size=r.training.batch_size,
                                         progress=s.progress, path=path)
            del models
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            lm.model.to("cpu")
        log.info("%s reference cache %s (%.1f MiB)", "reused" if reused else "built", path, cache.nbytes / 2**20)
        info = {"mode": "cache", "path": str(path), "reused": reused, "k": k, "models": ids,
                "size_mb": round(cache.nbytes / 2**20, 2),
                ("load_s" if reused else "build_s"): round(time.time() - t0, 2)}
        return cache, info


def _terms(rec: dict | None, keep: tuple[str, ...] = ()) -> dict | None:
    """An objective's terms for the record; ``kl_teacher`` of kl_top is named ``kl_instruct`` like the
    contrastive objective's pull term, so the two objectives' records compare directly."""
    if rec is None:
        return None
    out = {k: rec[k] for k in keep if k in rec}
    for k, v in rec.items():
        if k not in keep:
            out["kl_instruct" if k == "kl_teacher" else k] = v
    return out

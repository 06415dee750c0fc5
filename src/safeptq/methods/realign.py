"""Q-realign: the block-wise engine (LWC + LET, plus the RMSNorm gains in the default schedule) with
the :class:`~safeptq.objectives.ProbePush` objective — benign prompts reconstruct the full-precision
block output, a malicious prompt's last-token state goes back to the safe side (across the layer's
frozen probe, or to the aligned model's own state). The run record adds the probes' separability of
the full-precision model before and of the quantized model after, on held-out prompts
(``advbench:eval`` / ``alpaca:eval``, never the calibration rows)."""

from __future__ import annotations

import logging

from ..errors import ConfigError
from .base import Calibrated, Session
from .simple import BlockwiseMethod

__all__ = ["Realign"]

log = logging.getLogger(__name__)


class Realign(BlockwiseMethod):
    name = "realign"
    help = "Q-realign: block-wise LWC + LET; benign prompts reconstruct, malicious states go back to the safe side"
    run_file = "realign.json"

    def plan_probe_model(self, recipe) -> bool:
        return bool(recipe.probes.model) or not recipe.probes.path

    def plan_separability(self, recipe) -> bool:
        return recipe.probes.sep_limit > 0

    def objective(self, s: Session):
        return s.state["objective"]

    def calibrate(self, s: Session) -> Calibrated:
        s.state["objective"] = self._make_objective(s)
        before = self._separability(s, "before")
        self._shift_cosine(s, "before")
        cal = super().calibrate(s)
        r = s.recipe
        cal.record.update({
            "schedule": r.schedule,  # the objective's settings are under calibration.objective
            "probes": {"source": r.probes.path or r.probes.model or s.model_label, "cache": s.state["probes_where"],
                       "heldout_accuracy": s.state["probes"].meta.get("heldout_accuracy"),
                       "C": s.state["probes"].meta.get("C")},
            **before})
        return cal

    def after(self, s: Session, model) -> dict:
        return {**self._separability(s, "after"), **self._shift_cosine(s, "after")}

    def _make_objective(self, s: Session):
        from ..data.chat import set_chat_options
        from ..models import load_model
        from ..objectives import ProbePush
        from ..objectives.probe_push import STATE_TARGETS, mean_difference_probes
        from ..probes import LayerProbes
        from ..probes.workflow import ProbeSpec, get_probes

        r, lm = s.recipe, s.lm
        n_layers = lm.model.config.num_hidden_layers
        states = None
        if r.probes.path:
            probes, where = LayerProbes.load(r.probes.path), r.probes.path
        else:
            spec = ProbeSpec(seqlen=r.calib.seqlen, chat=r.calib.chat, C=r.probes.C, seed=r.seed, fit=r.probes.fit)
            if r.probes.model:
                ref = load_model(r.probes.model, dtype=s.dtype, device=s.device)
                set_chat_options(ref.tokenizer, r.system_prompt, r.chat_template_kwargs)
                probes, where = get_probes(ref.model, ref.tokenizer, ref.path, spec, data_dir=r.data_dir,
                                           progress=s.progress)
                if r.objective.malicious_target in STATE_TARGETS:
                    states = self._probe_model_states(ref.model, s)
                s.state["shift_ref"] = self._heldout_states(ref.model, ref.tokenizer, s)
                del ref
            else:
                lm.model.to(s.device)
                probes, where = get_probes(lm.model, lm.tokenizer, lm.path, spec, data_dir=r.data_dir,
                                           progress=s.progress)
                lm.model.to("cpu")
        if probes.n_layers != n_layers:
            raise ConfigError(f"the probes cover {probes.n_layers} layers but {s.model_label} has {n_layers}; "
                              "fit them on a model of the same architecture")
        s.state.update(probes=probes, probes_where=str(where) if where else None)
        o = r.objective
        push_probes, target = probes, o.malicious_target
        if target == "mean_diff":  # push across a dense direction of the probe model instead of the sparse probe
            push_probes, target = mean_difference_probes(states, s.calib.labels), "probe"
        obj = ProbePush(push_probes, probe_weight=o.probe_weight, margin=o.margin, benign_anchor=o.benign_anchor,
                        malicious_target=target, states=states)
        obj.label = o.malicious_target
        return obj

    @staticmethod
    def _probe_model_states(ref, s: Session):
        """[L, N, H]: the probe model's last-token states on the malicious calibration rows (zeros elsewhere)."""
        import torch

        from ..probes import last_token_states

        model, calib = s.lm.model, s.calib
        keys = ("num_hidden_layers", "hidden_size", "vocab_size")
        if any(getattr(ref.config, k) != getattr(model.config, k) for k in keys):
            raise ConfigError(f"probes.model {s.recipe.probes.model} does not match {s.model_label} (layers, hidden "
                              "size or vocabulary); the state target needs the model the fine-tune started from")
        # the mean-difference direction reads the benign rows too; the state targets only the malicious ones
        every = s.recipe.objective.malicious_target == "mean_diff"
        rows = torch.arange(len(calib)) if every else (calib.labels == 1).nonzero().flatten()
        out = torch.zeros(ref.config.num_hidden_layers, len(calib), ref.config.hidden_size)
        out[:, rows] = last_token_states(ref, calib, rows, progress=s.progress)
        return out

    @staticmethod
    def _heldout_texts(s: Session) -> list[str]:
        from ..probes.workflow import labelled_prompts

        limit = s.recipe.probes.sep_limit
        if limit == 0:
            return []
        texts, labels = labelled_prompts("advbench:eval", "alpaca:eval", limit=limit, data_dir=s.recipe.data_dir)
        return [t for t, y in zip(texts, labels.tolist()) if y == 1]

    def _heldout_states(self, model, tokenizer, s: Session):
        """[L, N, H] last-token states of the held-out malicious prompts (the separability's harmful half)."""
        from ..probes import collect_last_token_states

        texts = self._heldout_texts(s)
        if not texts:
            return None
        model.to(s.device)
        return collect_last_token_states(model, tokenizer, texts, chat=s.recipe.calib.chat, seqlen=s.recipe.calib.seqlen,
                                         progress=s.progress).cpu()

    def _shift_cosine(self, s: Session, stage: str) -> dict:
        """Per layer, the mean over held-out malicious prompts of cos(realigned − attacked, aligned − attacked) of
        the last-token states: 1 = the quantized model moved exactly towards the aligned model."""
        import torch

        if s.state.get("shift_ref") is None:
            return {}
        if stage == "before":
            s.state["shift_from"] = self._heldout_states(s.lm.model, s.lm.tokenizer, s)
            s.lm.model.to("cpu")
            return {}
        after = self._heldout_states(s.lm.model, s.lm.tokenizer, s)
        s.lm.model.to("cpu")
        start, ref = s.state["shift_from"], s.state["shift_ref"]
        cos = torch.nn.functional.cosine_similarity(after - start, ref - start, dim=-1)  # [L, N]
        per_layer = cos.mean(1).tolist()
        n = len(per_layer)
        return {"shift_cosine": {"per_layer": per_layer, "mean_late_layers": float(cos[n // 3:].mean()),
                                 "prompts": "advbench:eval", "n": int(cos.shape[1]),
                                 "definition": "cos(quantized - fine-tuned FP, probe model - fine-tuned FP) of the "
                                               "last-token states, mean over prompts"}}

    def _separability(self, s: Session, stage: str) -> dict:
        from ..probes import summarize
        from ..probes.workflow import labelled_prompts, separability_of

        r = s.recipe
        if r.probes.sep_limit == 0:
            return {}
        texts, labels = labelled_prompts("advbench:eval", "alpaca:eval", limit=r.probes.sep_limit,
                                         data_dir=r.data_dir)
        s.lm.model.to(s.device)
        sep = separability_of(s.lm.model, s.lm.tokenizer, s.state["probes"], texts, labels, chat=r.calib.chat,
                              seqlen=r.calib.seqlen, progress=s.progress)
        s.lm.model.to("cpu")
        n = len(sep["accuracy"])
        out = {"separability": {stage: {"per_layer": sep, "mean_late_layers": summarize(sep, from_layer=n // 3)},
                                "prompts": {"harmful": "advbench:eval", "benign": "alpaca:eval",
                                            "limit": r.probes.sep_limit}}}
        m = out["separability"][stage]["mean_late_layers"]
        log.info("separability %s: accuracy %.3f, malicious margin %+.2f, benign margin %+.2f (layers %d+)",
                 stage, m["accuracy"], m["margin_malicious"], m["margin_benign"], n // 3)
        return out

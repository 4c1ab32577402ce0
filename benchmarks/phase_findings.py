"""What the figures of benchmarks/phase_experiment.py say, in words: per leg, then the answer
to issue 12's question. Every statement is a comparison of measured numbers (read by
phase_report.py's helpers); none is written by hand, so a rerun cannot leave a stale claim."""

from __future__ import annotations

import math

from phase_report import anova, identical_fraction, label, largest_dce, largest_kl, num, pval, val

ACTIVE = ("multiplicative", "additive", "late", "several")  # couplings that act in eval mode


def effect(t: dict | None) -> float:
    return val(t["effect"]) if t else math.nan


def leg_line(leg: dict) -> str:
    iv = leg["intervene"]
    kl, dce, u = effect(largest_kl(iv)), effect(largest_dce(iv)), anova(iv, "U")
    same = identical_fraction(iv)
    text = (
        f"- {label(leg)}: largest mean KL {num(kl)} nats, largest |dCE| {num(abs(dce))} nats, "
        f"forced text identical to the control in {'n/a' if same is None else f'{same:.0%}'} "
        f"of samples, ANOVA of U across targets p = {pval(u and u['p'])}; `kssm intervene`: "
        f"{'CHANGED' if iv['verdict']['changed'] else 'no meaningful effect'}"
    )
    if kl == 0 and same == 1:
        text += (
            " (nothing moved at all: in eval mode this hook returns the layer's output "
            "unchanged, so no forcing of R can change the output)"
        )
    return text + "."


def answer(done: dict[str, dict]) -> list[str]:
    """The three readings of the published null, each judged by the legs that bear on it."""
    kl = {name: effect(largest_kl(leg["intervene"])) for name, leg in done.items()}
    out = []
    faithful = done.get("faithful")
    if faithful:
        silent = kl["faithful"] == 0 and identical_fraction(faithful["intervene"]) == 1
        out.append(
            "- **Eval-mode hook.** "
            + (
                "The faithful coupling cannot act in eval mode, and measured so: mean KL "
                "exactly 0 and every forced text the control's. Run as published, the "
                "experiment gives a null whatever R does."
                if silent
                else f"The faithful leg moved the output (largest mean KL {num(kl['faithful'])} "
                "nats), which its eval-mode hook should not allow: check the run."
            )
        )
    active = [n for n in ACTIVE if n in done]
    if active:
        top = max(active, key=lambda n: kl[n])
        changed = [n for n in active if done[n]["intervene"]["verdict"]["changed"]]
        minimum = done[top]["intervene"]["verdict"].get("minimum_effects", {}).get("kl", 0.01)
        detectable = [
            n for n in active if (largest_kl(done[n]["intervene"]) or {}).get("p_holm", 1) < 0.01
        ]
        u_ps = [val((anova(done[n]["intervene"], "U") or {}).get("p")) for n in active]
        if changed:
            text = (
                f"Forcing R changed the output by at least the stated minimum in "
                f"{', '.join(changed)}: once the hook acts, R is not epiphenomenal here."
            )
        else:
            seen = "detectably" if detectable else "but not detectably"
            text = (
                f"With a coupling that acts at inference ({', '.join(active)}), forcing R "
                f"moves the output {seen} (mean KL > 0 at p < 0.01 in {len(detectable)} of "
                f"{len(active)} legs), by at most {num(kl[top])} nats ({top}), "
                f"{minimum / kl[top] if kl[top] else math.inf:.2g}x below the {minimum:g}-nat "
                f"minimum; no leg changed a generated-text metric, and the published test, the "
                f"ANOVA of U across targets, gives p >= {pval(min(u_ps))}. On this base and "
                "budget the effect of R is "
                + ("real but negligible." if detectable else "not detectable.")
            )
        out.append("- **Real?** " + text)
    if "multiplicative" in done and ("additive" in done or "late" in done):
        out.append("- **Normalisation.** " + normalisation(done, kl))
    if "several" in done and "multiplicative" in done:
        out.append(
            f"- **Several layers.** Largest mean KL {num(kl['several'])} nats with cores at "
            f"{done['several']['hook_layers']} vs {num(kl['multiplicative'])} with one core at "
            f"{done['multiplicative']['hook_layers']}."
        )
    return out


def core_sizes(leg: dict) -> list[dict]:
    return (leg.get("size") or {}).get("cores", [])


def forcing_at_layer(leg: dict) -> str:
    return ", ".join(f"{c['forcing']:.2%}" for c in core_sizes(leg)) or "n/a"


def normalisation(done: dict[str, dict], kl: dict[str, float]) -> str:
    """Multiplicative vs additive at one layer, middle vs last layer: what forcing R changes
    where the core acts (phase_coupling_size.py) and what arrives at the logits."""
    names = [n for n in ("multiplicative", "additive", "late") if n in done]
    parts = [
        f"{n} {forcing_at_layer(done[n])} of the layer's output, mean KL {num(kl[n])} nats"
        for n in names
    ]
    text = (
        "Forcing R from 0.1 to 0.9 changes, at the hooked layer and at the logits: "
        + "; ".join(parts)
        + " (multiplicative and additive at the middle layer, late = multiplicative at the "
        "last layer, before the final norm)."
    )
    sizes = [c["forcing"] for n in names if n != "additive" for c in core_sizes(done[n])]
    if sizes:
        text += (
            f" A change of {min(sizes):.1%}-{max(sizes):.1%} of the output where a "
            f"multiplicative core acts reaches the logits as a mean KL of at most "
            f"{num(max(kl[n] for n in names if n != 'additive'))} nats."
        )
    add = core_sizes(done["additive"]) if "additive" in done else []
    if add:
        text += (
            f" The additive term does not grow with the layer's output (rms "
            f"{num(add[0]['rms_x'])}) and changes it by {add[0]['coupling']:.2%}."
        )
    if "additive" in kl:
        more = kl["additive"] > kl["multiplicative"]
        text += (
            f" The additive coupling moves the logits {'more' if more else 'less'} than the "
            "multiplicative one at the same layer"
        )
        both = kl["additive"] > 0 and kl["multiplicative"] > 0
        text += f" ({kl['additive'] / kl['multiplicative']:.2g}x)." if both else "."
    return text


def findings(legs: list[dict]) -> list[str]:
    done = {leg["name"]: leg for leg in legs if leg["intervene"]}
    if not done:
        return ["- No leg has finished its intervention yet."]
    return [*answer(done), "", "Per leg:", "", *(leg_line(leg) for leg in done.values())]

"""The human side of `score`: a markdown table and two PNG plots (drawn with Pillow).

- scores.md: per split, one row per domain (and "all") and one column per metric; then one row
  per rollout round; then the skipped metrics with their reasons. A metric that reports them gets
  its 95% interval ("interval", "per_domain_interval") and its chance level ("baseline": the best
  predictor that ignores the action text) printed in the same cell: `0.950 [0.91, 0.98] (chance 0.27)`.
- domains.png: a panel per metric, a bar per (split, domain), coloured by split.
- rounds.png: a panel per metric that has per-round values, a line per split (drift over rounds).
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# name -> (label, higher is better, what it measures)
METRICS = {
    "action_following": ("action following (strict)", True, "share of rounds that keep the object and change it as the "
                         "action says, within 35% of the domain's rate (world)"),
    "action_following_lenient": ("action following (lenient)", True, "share of rounds whose nearest candidate trajectory is "
                                 "the given action: any motion the right way counts (world)"),
    "action_following_held_out": ("held-out actions (strict)", True, "strict action following on rounds whose action the "
                                  "domain never showed in training (world transfer split)"),
    "temporal_object": ("object kept", True, "share of generated frames keeping the start object's colour and shape (world)"),
    "temporal_background": ("background kept", True, "share of background pixels kept within tolerance (world)"),
    "psnr_at_state": ("PSNR at the state shown dB", True, "generated frames vs the world's rendering of the position and "
                      "size they show, in the start colour: drawing alone, not where the object went (world)"),
    "psnr": ("PSNR dB", True, "generated vs ground-truth frames, mean over generated frames"),
    "ssim": ("SSIM", True, "generated vs ground-truth frames, mean over generated frames"),
    "fvd": ("FVD", False, "Frechet distance of I3D features, generated vs ground-truth clips"),
    "clip_score": ("CLIP score", True, "100 x cosine(frame, caption), mean over frames"),
}
SPLIT_COLOURS = [(52, 101, 164), (204, 102, 0), (78, 154, 6), (117, 80, 123), (164, 0, 0)]
PANEL = (340, 230)


def _label(name: str, plain: bool = False) -> str:
    label, higher, _ = METRICS.get(name, (name, True, ""))
    if plain:  # Pillow's built-in font has no arrows
        return f"{label} ({'higher' if higher else 'lower'} is better)"
    return f"{label} {'↑' if higher else '↓'}"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _cell(entry: dict, domain: str | None = None) -> str:
    """A value, with its 95% interval and the text-ignoring chance level where the metric reports them."""
    chance = entry.get("baseline") or {}
    if domain is None:
        value, interval, chance = entry.get("overall"), entry.get("interval"), chance.get("overall")
    else:
        value = entry.get("per_domain", {}).get(domain)
        interval = entry.get("per_domain_interval", {}).get(domain)
        chance = chance.get("per_domain", {}).get(domain)
    text = _fmt(value)
    if value is not None and interval:
        text += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
    if value is not None and chance is not None:
        text += f" (chance {chance:.2f})"
    return text


def _ordered(metrics: dict) -> list[str]:
    return [m for m in METRICS if m in metrics] + [m for m in metrics if m not in METRICS]


def markdown(scores: dict) -> str:
    lines = [
        f"# Scores: {scores['checkpoint']}",
        "",
        f"stage {scores['stage']}{', adapter ' + scores['adapter'] if scores.get('adapter') else ''}, "
        f"manifest {scores['manifest']}, seed {scores['seed']}, "
        f"{scores['per_domain'] or 'all'} episodes per domain, {scores['wall_seconds']} s",
    ]
    entries = [e for res in scores["splits"].values() for e in res["metrics"].values()]
    if any("interval" in e or "baseline" in e for e in entries):
        lines.append("value [95% bootstrap interval over episodes] (chance: the best text-ignoring, state-aware "
                     "predictor on the same rounds)")
    for split, res in scores["splits"].items():
        names = _ordered(res["metrics"])
        lines += ["", f"## {split}: {res['episodes']} episodes, {res['rounds']} rounds", ""]
        lines += ["| domain | " + " | ".join(_label(n) for n in names) + " |", "| --- |" + " ---: |" * len(names)]
        domains = sorted({d for n in names for d in res["metrics"][n].get("per_domain", {})})
        lines.append("| **all** | " + " | ".join(_cell(res["metrics"][n]) for n in names) + " |")
        for d in domains:
            lines.append(f"| {d} | " + " | ".join(_cell(res["metrics"][n], d) for n in names) + " |")
        by_round = [n for n in names if "per_round" in res["metrics"][n]]
        if by_round:
            lines += ["", "| round | " + " | ".join(_label(n) for n in by_round) + " |", "| ---: |" + " ---: |" * len(by_round)]
            for r in range(max(len(res["metrics"][n]["per_round"]) for n in by_round)):
                cells = [res["metrics"][n]["per_round"][r] if r < len(res["metrics"][n]["per_round"]) else None for n in by_round]
                lines.append(f"| {r + 1} | " + " | ".join(_fmt(c) for c in cells) + " |")
    if scores["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {name}: {why}" for name, why in scores["skipped"].items()]
    lines += ["", "## Metrics", ""] + [f"- {label}: {what}" for label, _, what in METRICS.values()]
    return "\n".join(lines) + "\n"


def _panel(title: str, series: list[tuple[str, list[float | None], tuple]], kind: str, xlabels: list[str]) -> Image.Image:
    """One chart: bars (one value per x, colour per series entry) or lines (one list per series)."""
    img = Image.new("RGB", PANEL, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=12)
    draw.text((8, 4), title, fill="black", font=font)
    left, top, right, bottom = 46, 40, PANEL[0] - 10, PANEL[1] - 42
    legend = dict((name, colour) for name, _, colour in series)
    x = left
    for name, colour in legend.items():
        draw.rectangle([x, 24, x + 10, 32], fill=colour)
        draw.text((x + 14, 21), name, fill="black", font=font)
        x += 24 + int(draw.textlength(name, font=font))
    values = [v for _, vals, _ in series for v in vals if v is not None]
    if not values:
        draw.text((left, top + 40), "no values", fill="gray", font=font)
        return img
    lo, hi = min(0.0, min(values)), max(values)
    if 0.0 <= lo and hi <= 1.0:  # shares and SSIM: a fixed 0..1 axis keeps panels comparable
        hi = 1.0
    hi = hi if hi > lo else lo + 1.0
    y = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)  # noqa: E731
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for v in (lo, (lo + hi) / 2, hi):
        draw.line([(left - 3, y(v)), (right, y(v))], fill=(225, 225, 225))
        draw.text((2, y(v) - 6), _fmt(v), fill="black", font=font)
    step = (right - left) / max(1, len(xlabels))
    for i, label in enumerate(xlabels):
        draw.text((left + i * step + 2, bottom + 4 + 12 * (i % 2)), label[:14], fill="black", font=font)
    if kind == "bars":
        for i, (_, (v,), colour) in enumerate(series):
            if v is not None:
                draw.rectangle([left + i * step + 3, y(max(v, lo)), left + (i + 1) * step - 3, y(lo)], fill=colour)
    else:
        for name, vals, colour in series:
            points = [(left + (i + 0.5) * step, y(v)) for i, v in enumerate(vals) if v is not None]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for px, py in points:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    return img


def _grid(panels: list[Image.Image], path: Path, columns: int = 3) -> None:
    rows = max(1, -(-len(panels) // columns))
    sheet = Image.new("RGB", (PANEL[0] * min(columns, max(1, len(panels))), PANEL[1] * rows), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % columns) * PANEL[0], (i // columns) * PANEL[1]))
    sheet.save(path)


def plot_domains(scores: dict, path: Path) -> None:
    splits = list(scores["splits"].items())
    names = _ordered({n: 0 for _, res in splits for n in res["metrics"]})
    panels = []
    for name in names:
        bars, labels = [], []
        for k, (split, res) in enumerate(splits):
            for d, v in res["metrics"].get(name, {}).get("per_domain", {}).items():
                bars.append((split, [v], SPLIT_COLOURS[k % len(SPLIT_COLOURS)]))
                labels.append(d)
        panels.append(_panel(f"{_label(name, plain=True)}, per domain", bars, "bars", labels))
    _grid(panels, path)


def plot_rounds(scores: dict, path: Path) -> None:
    splits = list(scores["splits"].items())
    names = [n for n in _ordered({n: 0 for _, res in splits for n in res["metrics"]})
             if any("per_round" in res["metrics"].get(n, {}) for _, res in splits)]
    panels = []
    for name in names:
        lines = [(split, res["metrics"][name]["per_round"], SPLIT_COLOURS[k % len(SPLIT_COLOURS)])
                 for k, (split, res) in enumerate(splits) if "per_round" in res["metrics"].get(name, {})]
        rounds = max(len(vals) for _, vals, _ in lines)
        panels.append(_panel(f"{_label(name, plain=True)}, per round", lines, "lines", [f"round {r + 1}" for r in range(rounds)]))
    _grid(panels, path)


def write_report(scores: dict, out_dir: Path) -> None:
    (out_dir / "scores.md").write_text(markdown(scores))
    plot_domains(scores, out_dir / "domains.png")
    plot_rounds(scores, out_dir / "rounds.png")

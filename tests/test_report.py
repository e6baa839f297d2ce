"""The HTML report renders from random data, stays self-contained and escapes sample text."""

import numpy as np
import pytest

from qgate.report import render_report
from qgate.scoring import top_k

DATASETS = ["alpaca", "dolly", "oasst1"]
EVIL = "<script>alert('x')</script> & more"


def _sample(i, datasets, q, text):
    return {"id": f"s{i}", "dataset": datasets[i], "q": q[i], "text": text}


def _render(tmp_path, direction_check=None, **overrides):
    rng = np.random.default_rng(0)
    n, n_layers = 200, 4
    q = rng.normal(size=n)
    datasets = [DATASETS[i % len(DATASETS)] for i in range(n)]
    keep = top_k(q, 0.3)
    mask = np.zeros(n, dtype=bool)
    mask[keep] = True
    S = rng.uniform(size=(n, n_layers))
    best = [_sample(i, datasets, q, EVIL if i == keep[0] else "ok") for i in keep[:5]]
    worst = [_sample(i, datasets, q, "x" * 1000) for i in np.argsort(q)[:5]]
    meta = {"run_id": "run-42", "model": "tiny-qwen3", "N": n, "k": len(keep), "alpha": 1.0, "eps": 1e-8,
            "tau": 0.0, "strategy": "top_k"}
    kwargs = {
        "q": q, "datasets": datasets, "selected_mask": mask, "threshold": float(q[keep[-1]]),
        "layer_a": S.min(0), "layer_b": S.max(0), "layer_mu": S.mean(0), "best": best, "worst": worst,
        "meta": meta, "direction_check": direction_check, **overrides,
    }
    render_report(tmp_path / "report.html", **kwargs)
    return (tmp_path / "report.html").read_text(encoding="utf-8")


def test_report_has_charts_tables_and_meta(tmp_path):
    page = _render(tmp_path)
    assert '<svg id="q-histogram"' in page and page.count('<g id="q-bar-') >= 40 and '<g id="q-cut"' in page
    assert '<svg id="layer-stats"' in page and all(f'<g id="layer-{s}"' in page for s in ("a", "b", "mu"))
    for name in DATASETS + ["run-42", "tiny-qwen3", "top_k", "Best samples", "Worst samples"]:
        assert name in page
    assert "x" * 300 in page and "x" * 301 not in page


def test_report_is_self_contained(tmp_path):
    page = _render(tmp_path)
    assert "<script" not in page
    assert "src=" not in page and "<link" not in page


def test_sample_text_is_escaped(tmp_path):
    page = _render(tmp_path)
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more" in page
    assert EVIL not in page


def test_failed_direction_check_shows_red_banner(tmp_path):
    check = {"auroc": 0.41, "direction": "higher", "per_kind": {"shuffle": 0.97, "truncate": 0.12},
             "passed": False, "threshold": 0.7}
    page = _render(tmp_path, direction_check=check)
    assert 'class="banner fail"' in page and "Direction self-check FAILED" in page
    assert "shuffle" in page and "truncate" in page


def test_the_kind_table_puts_held_out_kinds_first_beside_the_baselines(tmp_path):
    check = {"auroc": 0.8, "direction": "higher", "passed": True, "threshold": 0.7,
             "per_kind": {"char_noise": 0.99, "falsified": 0.41}, "heldout_kinds": ["falsified"],
             "blend": {"auroc": 0.82, "per_kind": {"char_noise": 0.98, "falsified": 0.52}},
             "baselines_per_kind": {"ifd": {"char_noise": 0.9, "falsified": 0.63}}}
    page = _render(tmp_path, direction_check=check)
    for header in ("held out", "AUROC q", "q+IFD blend", "IFD"):
        assert f"<th>{header}</th>" in page
    assert page.index("falsified") < page.index("char_noise")
    falsified_row = page[page.index("<td>falsified"):].split("</tr>")[0]
    assert all(value in falsified_row for value in ("0.41", "0.52", "0.63"))


def test_passed_direction_check_and_extra_sections(tmp_path):
    check = {"auroc": 0.91, "direction": "higher", "per_kind": {}, "passed": True, "threshold": 0.7}
    page = _render(tmp_path, direction_check=check, extra_sections=[("Peers", "<p>IFD 0.85</p>")])
    assert 'class="banner pass"' in page and "banner fail" not in page
    assert "<h2>Peers</h2><p>IFD 0.85</p>" in page


def test_no_banner_without_check(tmp_path):
    assert "banner" not in _render(tmp_path).split("</head>")[1]


@pytest.mark.parametrize("q", [np.full(10, 0.5), np.array([np.nan] * 3 + [1.0] * 7)])
def test_degenerate_scores_still_render(tmp_path, q):
    mask = np.zeros(len(q), dtype=bool)
    mask[:3] = True
    page = _render(tmp_path, q=q, datasets=["d"] * len(q), selected_mask=mask, threshold=0.5)
    assert '<svg id="q-histogram"' in page and "nan" not in page.split("<svg")[1].split("</svg>")[0]


def test_directory_path_receives_report_html(tmp_path):
    _render(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    render_report(out, q=[0.1, 0.2], datasets=["a", "b"], selected_mask=[False, True], threshold=0.2,
                  layer_a=[0.0], layer_b=[1.0], layer_mu=[0.5], best=[], worst=[], meta={"run_id": "r"})
    assert (out / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")

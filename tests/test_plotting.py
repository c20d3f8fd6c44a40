"""Tests for imta_fast.plotting: PNGs are written, one line per run per panel, labelled axes."""
import pytest

from imta_fast.plotting import plot_anytime, plot_budgeted, plot_wallclock

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACS = [339.90, 685.46, 1008.16, 1254.47, 1360.53]
RUNS = {
    "MSDNet (ce)": (MACS, [56.6, 65.0, 68.9, 70.4, 71.3]),
    "IMTA": (MACS, [57.3, 66.1, 69.8, 71.5, 72.4]),
}


def _png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    return data


def test_plot_anytime(tmp_path):
    path = tmp_path / "sub" / "anytime.png"
    fig = plot_anytime(RUNS, str(path), dataset="ImageNet", device="H100")
    _png(path)
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 2
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["MSDNet (ce)", "IMTA"]
    assert "MACs" in ax.get_xlabel() and "millions" in ax.get_xlabel() and "%" in ax.get_ylabel()
    assert "ImageNet" in ax.get_title() and "H100" in ax.get_title()
    assert list(ax.get_lines()[1].get_ydata()) == RUNS["IMTA"][1]


def test_plot_budgeted_three_runs(tmp_path):
    runs = {f"run {i}": ([100.0 * j + i for j in range(1, 9)], [50.0 + j + i for j in range(8)]) for i in range(3)}
    fig = plot_budgeted(runs, str(tmp_path / "budgeted.png"))
    _png(tmp_path / "budgeted.png")
    assert len(fig.axes[0].get_lines()) == 3
    assert "expected MACs" in fig.axes[0].get_xlabel()


def test_plot_wallclock_two_panels(tmp_path):
    ms = {"MSDNet (ce)": ([0.5, 0.8, 1.1], [60.0, 68.0, 71.0]), "IMTA": ([0.5, 0.8, 1.1], [61.0, 69.0, 72.0])}
    macs = {"MSDNet (ce)": ([400.0, 700.0, 1000.0], [60.0, 68.0, 71.0]), "IMTA": ([400.0, 700.0, 1000.0], [61.0, 69.0, 72.0])}
    fig = plot_wallclock(ms, str(tmp_path / "wall.png"), macs, dataset="ImageNet", device="H100", batch_size=256)
    _png(tmp_path / "wall.png")
    assert len(fig.axes) == 2 and [len(ax.get_lines()) for ax in fig.axes] == [2, 2]
    assert "ms per image" in fig.axes[0].get_xlabel() and "batch 256" in fig.axes[0].get_xlabel()
    assert "MACs" in fig.axes[1].get_xlabel()
    assert "H100" in fig.get_suptitle()
    one = plot_wallclock(ms, str(tmp_path / "wall1.png"))  # latency panel only
    assert len(one.axes) == 1


def test_mismatched_lengths_raise(tmp_path):
    with pytest.raises(ValueError):
        plot_anytime({"bad": ([1.0, 2.0], [3.0])}, str(tmp_path / "x.png"))

"""Image grids and the browser-linked frame slider."""

import matplotlib

matplotlib.use("agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from genlib import viz  # noqa: E402


def test_image_grid_places_each_image():
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 3).contiguous() * 40
    grid = viz.image_grid(images, nrow=4, pad=1)
    assert grid.shape == (2 * 3 + 1, 4 * 4 + 1, 1)
    for i in range(6):
        r, c = divmod(i, 4)
        assert (grid[1 + r * 3: 3 + r * 3, 1 + c * 4: 4 + c * 4] == 40 * i).all()
    assert (grid[0] == 255).all()


def test_image_grid_maps_minus_one_to_one_onto_bytes():
    grid = viz.image_grid(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1), nrow=3, pad=0)
    assert grid.ravel().tolist() == [0, 128, 255]


def test_frame_slider_links_slider_to_pictures_in_the_browser():
    import ipywidgets as widgets

    box = viz.frame_slider(lambda i, ax: ax.plot([0, i]), frames=3)
    slider, stack = box.children
    assert isinstance(slider, widgets.IntSlider) and slider.max == 2
    assert len(stack.children) == 3 and all(p.value[:4] == b"\x89PNG" for p in stack.children)
    assert stack.children[0].value != stack.children[2].value


def test_grid_points_cover_the_square():
    xs, ys, points = viz.grid_points(2.0, 5)
    assert points.shape == (25, 2) and np.isclose(points.min().item(), -2) and np.isclose(points.max().item(), 2)


def test_frame_slider_labels_follow_the_slider():
    import ipywidgets as widgets

    box = viz.frame_slider(lambda i, ax: ax.plot([0, i]), frames=2, labels=["sigma=1", "sigma=0.1"])
    slider, caption, stack = box.children
    assert isinstance(caption, widgets.Dropdown) and caption.options == ("sigma=1", "sigma=0.1")
    assert caption.index == 0 and len(stack.children) == 2


def test_show_pngs_puts_each_saved_picture_in_its_own_titled_panel(tmp_path):
    rng = np.random.default_rng(0)
    pictures = [rng.random((6, 5, 3)).astype(np.float32), rng.random((4, 7, 3)).astype(np.float32)]
    paths = [tmp_path / f"p{i}.png" for i in range(2)]
    for path, picture in zip(paths, pictures):
        plt.imsave(path, picture)
    axes = viz.show_pngs([(paths[0], "first"), (str(paths[1]), "second")])
    assert [ax.get_title() for ax in axes] == ["first", "second"]
    for ax, path in zip(axes, paths):
        assert ax.get_xticks().size == 0 and ax.get_yticks().size == 0
        np.testing.assert_array_equal(ax.images[0].get_array(), plt.imread(path))
    assert axes[0].figure.get_size_inches().tolist() == [9.0, 4.5]
    assert viz.show_pngs([(paths[0], "wide")], figsize=(12, 8))[0].figure.get_size_inches().tolist() == [12, 8]
    plt.close("all")
    with pytest.raises(ValueError, match="at least one"):
        viz.show_pngs([])
    with pytest.raises(ValueError, match="'lost'"):
        viz.show_pngs([(paths[0], "kept"), (None, "lost")])

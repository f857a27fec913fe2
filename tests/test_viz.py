"""Image grids and the browser-linked frame slider."""

import io

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
    assert isinstance(slider, widgets.IntSlider) and (slider.min, slider.value, slider.max) == (0, 0, 2)
    assert stack.selected_index == 0 and slider.continuous_update  # the first frame, and frames follow the drag
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


def browser_links(box) -> set[tuple[tuple[str, str], tuple[str, str]]]:
    """The two-way links (source, target) among the widgets of ``box``, by name, as the static book embeds them
    (every live widget's state, links included, with model references 'IPY_MODEL_<id>')."""
    import ipywidgets as widgets

    names = {f"IPY_MODEL_{child.model_id}": type(child).__name__ for child in box.children}
    links = set()
    for model in widgets.Widget.get_manager_state()["state"].values():
        if model["model_name"] == "LinkModel":
            (source, source_trait), (target, target_trait) = model["state"]["source"], model["state"]["target"]
            if source in names and target in names:
                links.add(((names[source], source_trait), (names[target], target_trait)))
    return links


@pytest.mark.parametrize("labels", [None, ["sigma=1", "sigma=0.1"]])
def test_frame_slider_embeds_a_browser_link_from_the_slider_value_to_the_shown_picture_and_caption(labels):
    box = viz.frame_slider(lambda i, ax: ax.plot([0, i]), frames=2, labels=labels)
    expected = {(("IntSlider", "value"), ("Stack", "selected_index"))}
    if labels is not None:
        expected.add((("IntSlider", "value"), ("Dropdown", "index")))
    assert browser_links(box) == expected  # jslink: a Python-side observe would not work in the static book


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
    assert axes[0].figure.get_size_inches().tolist() == [9.0, 4.5] and len(axes[0].figure.axes) == 2
    assert viz.show_pngs([(paths[0], "wide")], figsize=(12, 8))[0].figure.get_size_inches().tolist() == [12, 8]
    plt.close("all")
    with pytest.raises(ValueError, match="at least one"):
        viz.show_pngs([])
    with pytest.raises(ValueError, match="'lost'"):
        viz.show_pngs([(paths[0], "kept"), (None, "lost")])


def test_image_grid_has_no_spare_row_when_the_images_fill_the_rows():
    grid = viz.image_grid(torch.zeros(8, 1, 1, 1, dtype=torch.uint8), nrow=4, pad=1)
    assert grid.shape == (2 * 2 + 1, 4 * 2 + 1, 1)
    assert (grid[1::2, 1::2] == 0).all() and (grid[0::2] == 255).all() and (grid[:, 0::2] == 255).all()


def test_grid_points_run_x_along_columns_and_y_along_rows_of_an_uneven_box():
    xs, ys, points = viz.grid_points((0.0, 1.0, 10.0, 12.0), 3)
    expected = [[x, y] for y in (10.0, 11.0, 12.0) for x in (0.0, 0.5, 1.0)]
    assert points.tolist() == expected
    np.testing.assert_array_equal(xs, [[0.0, 0.5, 1.0]] * 3)
    np.testing.assert_array_equal(ys, [[10.0] * 3, [11.0] * 3, [12.0] * 3])


def test_field2d_shows_row_i_at_height_y_i_from_the_bottom():
    ax = viz.field2d(lambda p: p[:, 1] + 10 * p[:, 0], lim=1.0, n=3)  # a value that tells x from y
    image = ax.images[0]
    grid = np.linspace(-1, 1, 3)
    np.testing.assert_allclose(image.get_array(), grid[:, None] + 10 * grid[None, :], atol=1e-6)
    assert image.origin == "lower" and tuple(image.get_extent()) == (-1, 1, -1, 1)
    plt.close("all")


def test_quiver2d_draws_each_arrow_from_its_point_with_the_field_s_two_components():
    ax = viz.quiver2d(lambda p: p * torch.tensor([1.0, -2.0]), lim=1.0, n=3)
    arrows = ax.collections[0]
    np.testing.assert_allclose(arrows.U, arrows.X)
    np.testing.assert_allclose(arrows.V, -2 * arrows.Y)
    assert sorted(set(np.round(arrows.Y, 6))) == [-1.0, 0.0, 1.0]
    plt.close("all")


def test_scatter2d_plots_x_against_y_in_a_square_view():
    ax = viz.scatter2d(torch.tensor([[1.0, 2.0], [3.0, -4.0]]), lim=5.0, title="t")
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), [[1.0, 2.0], [3.0, -4.0]])
    assert ax.get_xlim() == (-5.0, 5.0) and ax.get_ylim() == (-5.0, 5.0) and ax.get_title() == "t"
    plt.close("all")


def test_save_scatter_draws_samples_over_data_and_counts_both(tmp_path, monkeypatch):
    _, ax = plt.subplots()
    monkeypatch.setattr(viz, "figure_png", lambda draw, **kw: draw(ax) or b"png")
    samples, data = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]), torch.zeros(5, 2)
    viz.save_scatter(samples, data, tmp_path / "s.png", lim=6.0)
    assert ax.get_title() == "3 samples over 5 data points" and (tmp_path / "s.png").read_bytes() == b"png"
    np.testing.assert_array_equal(ax.collections[1].get_offsets(), samples.numpy())  # on top of the data
    plt.close("all")


def test_loss_curves_plot_each_loss_against_the_step():
    ax = viz.loss_curves({"step": [10, 20, 30], "loss_d": [0.5, 0.4, 0.3], "loss_g": [1.0, 2.0, 3.0]})
    assert [line.get_label() for line in ax.get_lines()] == ["loss_d", "loss_g"]
    assert all(list(line.get_xdata()) == [10, 20, 30] for line in ax.get_lines())
    assert list(ax.get_lines()[1].get_ydata()) == [1.0, 2.0, 3.0]
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss"
    chosen = viz.loss_curves({"step": [1], "a": [2.0], "b": [3.0]}, keys=["b"])
    assert [line.get_label() for line in chosen.get_lines()] == ["b"]
    plt.close("all")


def test_scatter_panels_fill_rows_of_columns_and_hide_only_the_unused_axes(tmp_path, monkeypatch):
    figures, close = [], plt.close
    monkeypatch.setattr(viz.plt, "close", lambda fig=None: figures.append(fig))
    panels = [(f"p{i}", torch.randn(10, 2), torch.zeros(1, 2), 2.0) for i in range(5)]
    viz.save_scatter_panels(panels, tmp_path / "panels.png", columns=4)
    fig, = figures
    assert [ax.get_title() for ax in fig.axes] == ["p0", "p1", "p2", "p3", "p4", "", "", ""]
    assert [ax.axison for ax in fig.axes] == [True] * 5 + [False] * 3
    assert plt.imread(tmp_path / "panels.png").shape[:2] == (2 * 3 * 110, 4 * 3 * 110)
    close(fig)
    # by default as square a grid as the panels allow: 5 panels in 2 rows of 3, 9 in 3 of 3; the title on top
    for count, shape in ((5, (2, 3)), (9, (3, 3)), (1, (1, 1))):
        figures.clear()
        viz.save_scatter_panels(panels[:1] * count, tmp_path / "square.png", title="seed 0")
        fig, = figures
        assert len(fig.axes) == shape[0] * shape[1] and [text.get_text() for text in fig.texts] == ["seed 0"]
        assert plt.imread(tmp_path / "square.png").shape[:2] == (round((3 * shape[0] + 0.4) * 110), 3 * shape[1] * 110)
        close(fig)


def test_palette_png_is_smaller_and_looks_the_same(tmp_path):
    from PIL import Image

    fig, ax = plt.subplots(figsize=(4, 4))
    viz.scatter2d(torch.randn(2500, 2), ax, 3.0, c="tab:blue", s=1, alpha=0.3)
    fig.savefig(tmp_path / "full.png", format="png", dpi=110)
    viz.save_palette_png(fig, tmp_path / "palette.png", dpi=110)
    plt.close(fig)
    full = np.asarray(Image.open(tmp_path / "full.png").convert("RGB"), dtype=float)
    palette = Image.open(tmp_path / "palette.png")
    assert palette.mode == "P" and len(palette.getcolors()) <= 256
    assert np.abs(np.asarray(palette.convert("RGB"), dtype=float) - full).mean() < 1.0  # of 255 per channel
    assert (tmp_path / "palette.png").stat().st_size < 0.6 * (tmp_path / "full.png").stat().st_size
    again = (tmp_path / "palette.png").read_bytes()
    assert viz.palette_png(again) == again  # already a palette: left alone, so re-compacting changes nothing


def png_of(pixels: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 array [h, w, 3]."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="png")
    return buffer.getvalue()


def test_palette_png_keeps_full_colour_where_a_palette_would_band():
    from PIL import Image

    noise = png_of(np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8))  # no 256 colours fit it
    assert viz.palette_png(noise) == noise
    assert Image.open(io.BytesIO(viz.palette_png(noise, max_error=255))).mode == "P"  # a looser bound lets it through
    flat = png_of(np.repeat(np.repeat(np.arange(12, dtype=np.uint8).reshape(3, 4, 1) * 20, 30, 0), 30, 1)
                  .repeat(3, -1))  # 12 flat grey blocks
    compact = viz.palette_png(flat)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(compact)).convert("RGB")),
                          np.asarray(Image.open(io.BytesIO(flat)).convert("RGB")))


def test_figure_png_returns_palette_bytes_of_the_drawing():
    from PIL import Image

    image = Image.open(io.BytesIO(viz.figure_png(lambda ax: ax.plot([0, 1], [0, 1]), (2.0, 2.0), dpi=50)))
    assert image.mode == "P" and image.size == (100, 100)


def test_shared_colour_scale_spans_every_panel_s_values_unless_told():
    _, axes = plt.subplots(1, 3)
    for ax, shift in zip(axes, (0.0, 3.0, -2.0)):
        viz.field2d(lambda p, shift=shift: p[:, 0] + shift, lim=1.0, n=4, ax=ax)
    assert axes[1].images[0].get_clim() == (2.0, 4.0)  # each panel on its own range first
    image = viz.shared_colour_scale(axes)
    assert image is axes[2].images[0]
    assert {ax.images[0].get_clim() for ax in axes} == {(-3.0, 4.0)}  # the lowest and highest of all three
    viz.shared_colour_scale(axes[:2], vmin=-10.0)
    assert {ax.images[0].get_clim() for ax in axes[:2]} == {(-10.0, 4.0)}
    assert axes[2].images[0].get_clim() == (-3.0, 4.0)  # a panel not passed keeps its scale
    viz.shared_colour_scale(axes, vmax=1.5)
    assert {ax.images[0].get_clim() for ax in axes} == {(-3.0, 1.5)}
    plt.close("all")


def test_quiver2d_keeps_the_square_view_whatever_the_arrows():
    ax = viz.quiver2d(lambda p: 10 * p, lim=2.0, n=3, scale=1, scale_units="xy", angles="xy")
    assert ax.get_xlim() == (-2.0, 2.0) and ax.get_ylim() == (-2.0, 2.0)
    plt.close("all")


def test_energy_surface_names_reals_and_fakes_in_a_legend():
    points = torch.zeros(3, 2)
    ax = viz.energy_surface(lambda p: p.pow(2).sum(1), 1.0, n=5, real=points, fake=points + 0.5)
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["real", "fake"]
    assert viz.energy_surface(lambda p: p.pow(2).sum(1), 1.0, n=5).get_legend() is None
    only_reals = viz.energy_surface(lambda p: p.pow(2).sum(1), 1.0, n=5, real=points)
    assert [text.get_text() for text in only_reals.get_legend().get_texts()] == ["real"]
    plt.close("all")


def test_figure_png_frames_keep_one_size_whatever_their_titles():
    sizes = {plt.imread(io.BytesIO(viz.figure_png(lambda ax, t=title: ax.set_title(t), (3.0, 2.0), dpi=50))).shape
             for title in ("a", "a much longer title that reaches past the axes on both sides")}
    assert sizes == {(100, 150, 4)}


def test_the_toy_view_shows_every_mode_with_room_for_its_spread():
    from genlib import data as gdata

    assert viz.view_half_width(gdata.toy("grid25").modes) == pytest.approx(4.0 + 1.0)  # modes at -4, -2, ..., 4
    assert viz.view_half_width(gdata.toy("ring8").modes, margin=0.5) == pytest.approx(2.0 + 0.5)  # radius 2


@pytest.mark.parametrize("channels, count, nrow", [(1, 64, 8), (3, 10, 4)])
def test_read_image_grid_gives_back_the_saved_images(tmp_path, channels, count, nrow):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, channels, 9, 9), dtype=torch.uint8, generator=gen)
    viz.save_image_grid(images, tmp_path / "grid.png", nrow=nrow)
    back = viz.read_image_grid(tmp_path / "grid.png", nrow=nrow, channels=channels)
    rows = -(-count // nrow)
    assert back.shape == (rows * nrow, channels, 9, 9) and back.dtype == torch.uint8
    assert torch.equal(back[:count], images)
    assert (back[count:] == 255).all()  # the unused tiles of the last row are margin colour
    picture = plt.imread(tmp_path / "grid.png")
    assert picture.shape[-1] == 3 or (picture[..., 3] == 1).all()  # opaque: no grey level leaks into an alpha


def test_read_image_grid_refuses_a_picture_that_is_not_such_a_grid(tmp_path):
    plt.imsave(tmp_path / "odd.png", np.zeros((30, 31, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="not a grid of 8 square images"):
        viz.read_image_grid(tmp_path / "odd.png")


def test_read_image_grid_refuses_tiles_no_wider_than_their_margin(tmp_path):
    plt.imsave(tmp_path / "margins.png", np.zeros((9, 9, 3), dtype=np.uint8))  # 8 tiles of 1 pixel a row: margin only
    with pytest.raises(ValueError, match="not a grid"):
        viz.read_image_grid(tmp_path / "margins.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_show_images_shows_grey_in_a_grey_map_and_colour_as_it_is_on_the_byte_scale(channels):
    images = torch.randint(0, 256, (4, channels, 3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shown = viz.show_images(images, nrow=2, title="four").images[0]
    grid = viz.image_grid(images, nrow=2)
    np.testing.assert_array_equal(shown.get_array(), grid[..., 0] if channels == 1 else grid)
    assert shown.get_clim() == (0, 255) and shown.axes.get_title() == "four" and not shown.axes.axison
    if channels == 1:
        assert shown.get_cmap().name == "gray"
    plt.close("all")


def test_palette_png_accepts_a_palette_exactly_as_far_off_as_allowed():
    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buffer, format="png")
    png = buffer.getvalue()

    def rgb(picture: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(picture)).convert("RGB"), dtype=np.int16)

    reduced = viz.palette_png(png, max_error=255)  # any error allowed: always the palette
    error = int(np.abs(rgb(reduced) - rgb(png)).max())  # the palette's worst pixel
    assert Image.open(io.BytesIO(reduced)).mode == "P" and error > 0
    assert viz.palette_png(png, max_error=error) == reduced
    assert viz.palette_png(png, max_error=error - 1) == png


def test_scatter_panels_leave_the_samples_on_a_mode_visible_under_its_marker(tmp_path):
    # a good run puts most samples on the modes: the marker must not hide them (opaque dots hid about half)
    torch.manual_seed(0)
    modes = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 1.0]])
    samples = modes.repeat(200, 1) + 0.05 * torch.randn(600, 2)  # the grid toy's std, in its view

    def blue_pixels(shown_modes: torch.Tensor) -> int:
        viz.save_scatter_panels([("run", samples, shown_modes, 4.6)], tmp_path / "p.png")
        rgb = plt.imread(tmp_path / "p.png")[..., :3]
        return int(((rgb[..., 2] > rgb[..., 0] + 0.15) & (rgb[..., 2] > 0.5)).sum())

    unmarked = blue_pixels(torch.full((1, 2), 50.0))  # the marker far outside the view
    assert blue_pixels(modes) >= 0.85 * unmarked > 0

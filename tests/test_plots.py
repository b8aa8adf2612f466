"""The report charts (matplotlib on the Agg canvas): PIL images of the asked size, whatever the data."""
import math

import numpy as np

from vqgan.eval.report import bar_plot, histogram_plot, line_plot


def test_charts_are_pil_images_of_the_asked_size_for_any_data():
    xs = list(range(0, 100, 10))
    curves = {"loss": (xs, [1.0 / (1 + x) for x in xs]), "bad": (xs, [math.nan, -1.0, 0.0] + [None] * 7)}
    for image, size in ((line_plot(curves, "losses", log_y=True, ylabel="loss"), (640, 360)),
                        (line_plot({}, "nothing yet"), (640, 360)),
                        (bar_plot([5, 3, 1, 0], "codes", size=(320, 160)), (320, 160)),
                        (bar_plot([], "codes"), (640, 200)),
                        (histogram_plot([20.0, 21.5, 22.0, math.inf], "PSNR", "PSNR (dB)"), (640, 300)),
                        (histogram_plot([], "PSNR", "PSNR (dB)"), (640, 300))):
        assert image.mode == "RGB" and image.size == size
        assert np.asarray(image).std() > 0  # something is drawn

"""A known quadratic motion, for the tests of --transform quadratic."""

import cv2
import numpy as np

from common import Transform


def bending(side, bend_px, degrees=3.0, scale=1.02, shift=(15.0, -10.0)):
    """A quadratic fixed_from_moving (a Transform, pixels of a ``side`` x ``side`` image): a
    rotation, scale and shift about the image centre, bent by quadratic terms that move the
    image's edges by about ``bend_px`` (in coordinates u with the centre at 0 and the edges at
    +-1, each term is bend_px * u * u)."""
    c = (side - 1) / 2
    unit_from_pixel = np.array([[1 / c, 0, -1], [0, 1 / c, -1], [0, 0, 1]])
    b = bend_px / c
    m = np.zeros((2, 6))
    m[:, :2] = cv2.getRotationMatrix2D((0, 0), degrees, scale)[:, :2]
    m[:, 2] = np.array(shift) / c
    m[:, 3:] = [[b, 0.5 * b, -0.5 * b], [0.3 * b, -0.4 * b, b]]
    return Transform(m).compose(np.linalg.inv(unit_from_pixel), unit_from_pixel)

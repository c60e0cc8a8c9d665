"""Small gmsh-built user meshes of a channel with a bump, in 2-D and 3-D, for the tests.

The channel is [0, L] x [b(x), H] (x [0, L_z] in 3-D) with the bottom
``b(x) = bump (1 - cos(2 pi x / L)) / 2``, periodic in x (and z). Physical groups: ``bottom``
and ``top`` (walls), ``left``/``right`` (x = 0, L) and, in 3-D, ``front``/``back`` (z = 0,
L_z), and the cells ``fluid``. Hexahedra (quadrilaterals in 2-D) are a transfinite section
extruded in layers, so that the 3-D mesh is the 2-D one repeated across the span.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LENGTH, HEIGHT, SPAN = 2.0, 1.0, 1.5


def bottom(x: np.ndarray | float, bump: float) -> np.ndarray | float:
    """Height of the bottom wall at x."""
    return bump * 0.5 * (1.0 - np.cos(2.0 * np.pi * np.asarray(x) / LENGTH))


def _translation(dx: float, dy: float, dz: float) -> list[float]:
    return [1, 0, 0, dx, 0, 1, 0, dy, 0, 0, 1, dz, 0, 0, 0, 1]


def bump_channel_msh(
    path: str | Path,
    *,
    bump: float = 0.2,
    size: float = 0.25,
    dim: int = 3,
    hexahedra: bool = False,
    columns: int = 8,
    rows: int = 4,
    layers: int = 3,
    periodic_span: bool = True,
) -> Path:
    """Write the channel's mesh to a ``.msh`` file.

    Args:
        path: the file to write.
        bump: height of the bump (0: a flat channel).
        size: tetrahedra/triangles: target cell size.
        dim: 2 or 3.
        hexahedra: structured quadrilaterals (2-D) or hexahedra (3-D) of ``columns`` x
            ``rows`` cells in the section and ``layers`` across the span.
        columns, rows, layers: cells along x, y and z of the structured mesh.
        periodic_span: 3-D tetrahedra: make the front and back node-matched (False: meshed
            independently, so that they do not match).

    Returns:
        The path.
    """
    from meshes.unstructured import gmsh_session

    with gmsh_session("bump_channel") as gmsh:
        geo = gmsh.model.geo
        xs = np.linspace(0.0, LENGTH, 17)
        points = [geo.addPoint(x, float(bottom(x, bump)), 0, size) for x in xs]
        top_right = geo.addPoint(LENGTH, HEIGHT, 0, size)
        top_left = geo.addPoint(0, HEIGHT, 0, size)
        curves = {
            "bottom": geo.addSpline(points),
            "right": geo.addLine(points[-1], top_right),
            "top": geo.addLine(top_right, top_left),
            "left": geo.addLine(top_left, points[0]),
        }
        section = geo.addPlaneSurface([geo.addCurveLoop(list(curves.values()))])
        if hexahedra:
            for name, count in (("bottom", columns), ("top", columns), ("left", rows),
                                ("right", rows)):
                geo.mesh.setTransfiniteCurve(curves[name], count + 1)
            geo.mesh.setTransfiniteSurface(section)
            geo.mesh.setRecombine(2, section)
        groups: dict[str, list[int]] = {}
        if dim == 2:
            geo.synchronize()
            groups = {name: [tag] for name, tag in curves.items()}
            cells = [section]
        else:
            extruded = geo.extrude(
                [(2, section)], 0, 0, SPAN,
                numElements=[layers] if hexahedra else [],
                recombine=hexahedra,
            )
            geo.synchronize()
            # extrude returns the top (back) surface, the volume, then one surface per curve
            back, volume, *sides = (tag for _, tag in extruded)
            groups = {"front": [section], "back": [back]}
            groups |= {name: [side] for name, side in zip(curves, sides, strict=True)}
            cells = [volume]
        for name, tags in groups.items():
            gmsh.model.addPhysicalGroup(dim - 1, tags, name=name)
        gmsh.model.addPhysicalGroup(dim, cells, name="fluid")
        if dim == 2:
            gmsh.model.mesh.setPeriodic(1, [curves["right"]], [curves["left"]],
                                        _translation(LENGTH, 0, 0))
        elif not hexahedra:
            gmsh.model.mesh.setPeriodic(2, groups["right"], groups["left"],
                                        _translation(LENGTH, 0, 0))
            if periodic_span:
                gmsh.model.mesh.setPeriodic(2, groups["back"], groups["front"],
                                            _translation(0, 0, SPAN))
            else:  # a coarser back: its vertices are not the front's
                gmsh.model.mesh.setSize(gmsh.model.getBoundary([(2, groups["back"][0])],
                                                               recursive=True), 0.6 * size)
        gmsh.model.mesh.generate(dim)
        gmsh.write(str(path))
    return Path(path)

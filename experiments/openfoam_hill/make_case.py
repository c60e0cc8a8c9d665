"""Make the small OpenFOAM periodic-hill case shipped in ``tests/data/openfoam_hill/``.

A coarse periodic hill at alpha = 1 (h = 1, L = 9, top wall at 85/28; docs/physics.md) meshed with
blockMesh (three blocks: the two hill flanks and the floor, graded towards both walls, one cell
thick with ``empty`` front and back), cyclic left/right patches, laminar flow with nu = 0.01,
driven by the ``meanVelocityForce`` fvOption to the bulk velocity U_b = 0.721039 (docs/physics.md),
run with simpleFoam (SIMPLEC, second-order ``linearUpwind`` convection) until every initial
residual is below 1e-9, then ``postProcess -func writeCellCentres``.

Needs OpenFOAM (v1912 from Debian: ``apt-get install openfoam``; its binaries are on the PATH
and ``WM_PROJECT_DIR=/usr/share/openfoam``). Not for CI: the test reads the shipped files.

    python experiments/openfoam_hill/make_case.py                # writes tests/data/openfoam_hill
    python experiments/openfoam_hill/make_case.py --work /tmp/of # keep the full case there

Only what the reader needs is shipped: ``system/``, ``constant/`` (transport, laminar model,
fvOptions, ``polyMesh``), ``0/`` and the final time's ``U`` and ``C``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from meshes.hills import TOP_WALL_HEIGHT, hill_flank_length, hill_period, hill_profile
from vcnn.physics import DEFAULT_PHYSICS

ROOT = Path(__file__).resolve().parents[2]

ALPHA = 1.0
NU = DEFAULT_PHYSICS.nu
BULK_VELOCITY = DEFAULT_PHYSICS.bulk_velocity
#: Cells along the two flank blocks, the floor block, and across the channel.
FLANK_CELLS, FLOOR_CELLS, CROSS_CELLS = 14, 34, 48
#: Ratio of the cell size in the middle of the channel to the one at each wall.
WALL_GRADING = 6.0
THICKNESS = 0.1
#: Points of the polyLine that describes each hill flank.
PROFILE_POINTS = 60
DESTINATION = ROOT / "tests" / "data" / "openfoam_hill"
BOUNDARY_FILE = "constant/polyMesh/boundary"

HEADER = """FoamFile
{{
    version     2.0;
    format      ascii;
    class       {cls};
    object      {obj};
}}
"""


def header(cls: str, obj: str, location: str | None = None) -> str:
    text = HEADER.format(cls=cls, obj=obj)
    if location is not None:
        text = text.replace("    object", f'    location    "{location}";\n    object')
    return text


def block_mesh_dict() -> str:
    length = hill_period(ALPHA)
    flank = hill_flank_length(ALPHA)
    x_corners = [0.0, flank, length - flank, length]
    y_bottom = [float(hill_profile(x, ALPHA)) for x in x_corners]
    y_bottom[0] = y_bottom[-1] = 1.0  # both crests exactly at h = 1: node-matched cyclic sides
    vertices = []
    for z in (0.0, THICKNESS):
        vertices += [(x, y, z) for x, y in zip(x_corners, y_bottom, strict=True)]
        vertices += [(x, TOP_WALL_HEIGHT, z) for x in x_corners]

    def bottom(i: int, plane: int) -> int:
        return 8 * plane + i

    def top(i: int, plane: int) -> int:
        return 8 * plane + 4 + i

    grading = f"((0.5 0.5 {WALL_GRADING}) (0.5 0.5 {1.0 / WALL_GRADING:.12g}))"
    blocks = []
    for k, cells in enumerate((FLANK_CELLS, FLOOR_CELLS, FLANK_CELLS)):
        corners = [bottom(k, 0), bottom(k + 1, 0), top(k + 1, 0), top(k, 0)]
        corners += [bottom(k, 1), bottom(k + 1, 1), top(k + 1, 1), top(k, 1)]
        blocks.append(
            f"    hex ({' '.join(map(str, corners))}) ({cells} {CROSS_CELLS} 1) "
            f"simpleGrading (1 {grading} 1)"
        )
    edges = []
    for k, (start, end) in ((0, (0.0, flank)), (2, (length - flank, length))):
        x = np.linspace(start, end, PROFILE_POINTS + 2)[1:-1]
        y = hill_profile(x, ALPHA)
        for plane, z in ((0, 0.0), (1, THICKNESS)):
            points = " ".join(f"({xi:.10g} {yi:.10g} {z:g})" for xi, yi in zip(x, y, strict=True))
            edges.append(f"    polyLine {bottom(k, plane)} {bottom(k + 1, plane)} ({points})")

    def faces(quads: list[tuple[int, int, int, int]]) -> str:
        return " ".join(f"({a} {b} {c} {d})" for a, b, c, d in quads)

    bottom_faces = [
        (bottom(k, 0), bottom(k + 1, 0), bottom(k + 1, 1), bottom(k, 1)) for k in range(3)
    ]
    top_faces = [(top(k, 0), top(k, 1), top(k + 1, 1), top(k + 1, 0)) for k in range(3)]
    side_faces = [(bottom(k, 0), top(k, 0), top(k + 1, 0), bottom(k + 1, 0)) for k in range(3)]
    side_faces += [(bottom(k, 1), bottom(k + 1, 1), top(k + 1, 1), top(k, 1)) for k in range(3)]
    left = [(bottom(0, 0), bottom(0, 1), top(0, 1), top(0, 0))]
    right = [(bottom(3, 0), top(3, 0), top(3, 1), bottom(3, 1))]
    vertex_lines = "\n".join(f"    ({x:.12g} {y:.12g} {z:g})" for x, y, z in vertices)
    return (
        header("dictionary", "blockMeshDict", "system")
        + "\nconvertToMeters 1;\n\nvertices\n(\n"
        + vertex_lines
        + "\n);\n\nblocks\n(\n"
        + "\n".join(blocks)
        + "\n);\n\nedges\n(\n"
        + "\n".join(edges)
        + "\n);\n\nboundary\n(\n"
        + f"    bottom {{ type wall; faces ({faces(bottom_faces)}); }}\n"
        + f"    top {{ type wall; faces ({faces(top_faces)}); }}\n"
        + f"    left {{ type cyclic; neighbourPatch right; faces ({faces(left)}); }}\n"
        + f"    right {{ type cyclic; neighbourPatch left; faces ({faces(right)}); }}\n"
        + f"    frontAndBack {{ type empty; faces ({faces(side_faces)}); }}\n"
        + ");\n\nmergePatchPairs\n(\n);\n"
    )


CONTROL_DICT = """
application     simpleFoam;
startFrom       latestTime;
startTime       0;
stopAt          endTime;
endTime         20000;
deltaT          1;
writeControl    timeStep;
writeInterval   20000;
purgeWrite      0;
writeFormat     ascii;
writePrecision  10;
writeCompression off;
timeFormat      general;
timePrecision   6;
runTimeModifiable false;
"""

FV_SCHEMES = """
ddtSchemes      { default steadyState; }
gradSchemes     { default Gauss linear; }
divSchemes
{
    default         none;
    div(phi,U)      bounded Gauss linearUpwind grad(U);
    div((nuEff*dev2(T(grad(U))))) Gauss linear;
}
laplacianSchemes { default Gauss linear corrected; }
interpolationSchemes { default linear; }
snGradSchemes   { default corrected; }
"""

FV_SOLUTION = """
solvers
{
    p
    {
        solver          GAMG;
        smoother        GaussSeidel;
        tolerance       1e-12;
        relTol          0.01;
    }
    U
    {
        solver          smoothSolver;
        smoother        symGaussSeidel;
        tolerance       1e-13;
        relTol          0.01;
    }
}

SIMPLE
{
    nNonOrthogonalCorrectors 1;
    consistent      yes;
    pRefCell        0;
    pRefValue       0;
    residualControl
    {
        p               1e-9;
        U               1e-9;
    }
}

relaxationFactors
{
    equations
    {
        U               0.9;
    }
}
"""

TRANSPORT = f"""
transportModel  Newtonian;
nu              {NU};
"""

TURBULENCE = """
simulationType  laminar;
"""

FV_OPTIONS = f"""
momentumSource
{{
    type            meanVelocityForce;
    selectionMode   all;
    fields          (U);
    Ubar            ({BULK_VELOCITY} 0 0);
}}
"""

BOUNDARY_U = """
boundaryField
{
    bottom          { type noSlip; }
    top             { type noSlip; }
    left            { type cyclic; }
    right           { type cyclic; }
    frontAndBack    { type empty; }
}
"""

BOUNDARY_P = """
boundaryField
{
    bottom          { type zeroGradient; }
    top             { type zeroGradient; }
    left            { type cyclic; }
    right           { type cyclic; }
    frontAndBack    { type empty; }
}
"""


def write_case(case: Path) -> None:
    """Write every dictionary of the case."""
    files = {
        "system/blockMeshDict": block_mesh_dict(),
        "system/controlDict": header("dictionary", "controlDict", "system") + CONTROL_DICT,
        "system/fvSchemes": header("dictionary", "fvSchemes", "system") + FV_SCHEMES,
        "system/fvSolution": header("dictionary", "fvSolution", "system") + FV_SOLUTION,
        "constant/transportProperties": header("dictionary", "transportProperties", "constant")
        + TRANSPORT,
        "constant/turbulenceProperties": header("dictionary", "turbulenceProperties", "constant")
        + TURBULENCE,
        "constant/fvOptions": header("dictionary", "fvOptions", "constant") + FV_OPTIONS,
        "0/U": header("volVectorField", "U", "0")
        + f"\ndimensions      [0 1 -1 0 0 0 0];\n\ninternalField   uniform ({BULK_VELOCITY} 0 0);\n"
        + BOUNDARY_U,
        "0/p": header("volScalarField", "p", "0")
        + "\ndimensions      [0 2 -2 0 0 0 0];\n\ninternalField   uniform 0;\n"
        + BOUNDARY_P,
    }
    for name, text in files.items():
        path = case / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def run(case: Path, *command: str) -> str:
    """Run an OpenFOAM utility in the case; its log goes to ``log.<utility>``."""
    env = {**os.environ, "WM_PROJECT_DIR": os.environ.get("WM_PROJECT_DIR", "/usr/share/openfoam")}
    result = subprocess.run(
        [*command, "-case", str(case)], capture_output=True, text=True, env=env, check=False
    )
    (case / f"log.{command[0]}").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}{result.stderr}")
    return result.stdout


def final_time(case: Path) -> Path:
    times = [p for p in case.iterdir() if p.is_dir() and _is_number(p.name)]
    return max(times, key=lambda p: float(p.name))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def ship(case: Path, destination: Path) -> None:
    """Copy the files the test needs (and the dictionaries that made them)."""
    if destination.exists():
        shutil.rmtree(destination)
    last = final_time(case)
    keep = [
        "system/blockMeshDict",
        "system/controlDict",
        "system/fvSchemes",
        "system/fvSolution",
        "constant/transportProperties",
        "constant/turbulenceProperties",
        "constant/fvOptions",
        BOUNDARY_FILE,
        "constant/polyMesh/points",
        "constant/polyMesh/faces",
        "constant/polyMesh/owner",
        "constant/polyMesh/neighbour",
        "0/U",
        "0/p",
        f"{last.name}/U",
        f"{last.name}/C",
    ]
    for name in keep:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.startswith(("constant/polyMesh/", f"{last.name}/")) and name != BOUNDARY_FILE:
            # Mesh and fields compressed as OpenFOAM itself writes them (writeCompression on);
            # mtime 0 so that regenerating gives the same bytes.
            data = gzip.compress((case / name).read_bytes(), compresslevel=9, mtime=0)
            target.with_name(target.name + ".gz").write_bytes(data)
        else:
            shutil.copy2(case / name, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="case folder to run in (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=DESTINATION, help="where to ship the files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        case = args.work or Path(scratch) / "openfoam_hill"
        if case.exists():
            shutil.rmtree(case)
        write_case(case)
        run(case, "blockMesh")
        print(run(case, "checkMesh").split("Mesh stats")[-1][:1500])
        log = run(case, "simpleFoam")
        converged = [line for line in log.splitlines() if "converged" in line]
        print("\n".join(converged[-2:]) or log[-2000:])
        run(case, "postProcess", "-func", "writeCellCentres", "-latestTime")
        ship(case, args.out)
        print(f"shipped {final_time(case).name}/U and C to {args.out}")


if __name__ == "__main__":
    main()

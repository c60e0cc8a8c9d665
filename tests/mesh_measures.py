"""Global areas and boundary lengths of dolfinx meshes (shared by the mesh tests)."""

from mpi4py import MPI


def assemble_total(integrand, mesh) -> float:
    import dolfinx.fem

    value = dolfinx.fem.assemble_scalar(dolfinx.fem.form(integrand))
    return mesh.comm.allreduce(value, op=MPI.SUM)


def boundary_lengths(tagged) -> dict[str, float]:
    import ufl

    ds = ufl.Measure("ds", domain=tagged.mesh, subdomain_data=tagged.facet_tags)
    return {name: assemble_total(1.0 * ds(tag), tagged.mesh) for name, tag in tagged.boundaries.items()}


def mesh_area(mesh) -> float:
    import ufl

    return assemble_total(1.0 * ufl.dx(domain=mesh), mesh)

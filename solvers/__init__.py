"""FEniCSx solvers: laminar flow, closure transport, derived fields, periodicity, coupled runs."""

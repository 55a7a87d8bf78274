"""HTTP front-end processes: each reads, decodes and crops requests on the public port and passes them to
the engine; their supervisor in the engine starts, replaces and stops them. Imports no torch."""

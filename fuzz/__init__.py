"""kiln's fuzzer, in the style of Tzer: coverage-guided joint mutation of graphs and pass pipelines
(kiln's own IR and passes) and of TIR and TVM pass sequences (the kernels codegen emits).

Modules: ``generate`` (valid typed graphs, pass-targeting patterns), ``mutate`` (graph and
pipeline mutators), ``tir`` (PrimFunc mutators, TVM pass sequences, the TIR oracle),
``coverage`` (kiln arcs, structural features, error sites), ``oracle`` (the graph oracle),
``worker`` (crash/hang isolation), ``reduce`` (delta debugging), ``findings`` (reproducer
folders, replay), ``campaign`` (the loop), ``report`` and ``cli`` (``kiln fuzz``).
"""

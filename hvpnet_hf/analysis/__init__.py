"""
The paper's analyses of a trained model, one command each (`python -m hvpnet_hf.analysis.<name> --help`):

- `robustness`: a trained model with its images shuffled, blanked or masked (the error-sensitivity claim).
- `gates`: the mean dynamic-gate weight per text layer and backbone stage (Figure 4).
- `attention`: one example's entity-to-image-prefix attention per layer (Table 2).

They need only a model folder and read the bundled sample set (or a data file), so they run from an installed wheel.
The experiments that train (seeds, the ablations of Table 1, low resource, cross-task transfer) are scripts of the
repository: `examples/paper/`. Plots need matplotlib (`pip install hvpnet_hf[analysis]`), which nothing else in the
package imports.
"""

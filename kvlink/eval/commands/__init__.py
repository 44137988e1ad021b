"""The subcommands of `kvlink-bench`, one module each; kvlink.eval.cli lists them and dispatches.

Every module has `add_parser(sub)`, which adds the command's parser to `sub` (its help and arguments,
and `func`: what runs the parsed arguments), and one of:

- `run(args) -> int`: runs the command on the arguments kvlink-bench parsed (quality, calibrate,
  e2e, entropy, sensitivity, report);
- `run_argv(argv) -> int | None`: the command's benchmark module parses its arguments itself
  (abuse, scale, ttft, kernels): kvlink-bench hands it everything after the command's name before
  parsing anything, and parses them with its own parser only when it answers None.

The measurements themselves live beside, in kvlink.eval (grid, report, e2e, bench_scale, ...): a
command module holds the arguments and the glue that prints and writes.
"""

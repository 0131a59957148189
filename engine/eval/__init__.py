"""`ai-engine eval`: the simulator's model trial, automated (docs/eval.md).

Each case's interview is asked question by question against each model and sampling setting, as
the simulator's backend asks it; every reply is timed and checked, and the simulator's rule says
whether to adopt the model. The parts, one module each:

- cases.py: the case file (JSON), read and validated;
- targets.py: where the questions go: an engine URL with the simulator's `/generate` contract,
  or this engine started in process on a model;
- interview.py: one interview, prompt by prompt, with the reply appended to the transcript;
- checks.py: the automatic checks on every reply (a table of named functions);
- judge.py: the optional judge model's ratings, asked through the engine's API;
- verdict.py: the simulator's adoption rule and the per-setting summary;
- run.py: the whole trial (cases × models × settings) with a progress bar;
- report.py writes the outputs all at once: results.json, report.md (markdown.py), report.html
  (html.py), the charts (charts.py); sheet.py holds what both renderings share;
- command.py: the `ai-engine eval` subcommand.
"""

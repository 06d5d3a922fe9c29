"""The evaluation harness (report section "Evaluation": Tables 5, 6 and 7, and "Memorization
Evaluations").

* :mod:`.metrics` -- pure scorers: acc / acc_norm, QA normalisation, maj@k, pass@k, edit distance, CIs;
* :mod:`.engine` -- batched log-likelihoods with prefix reuse, batched generation;
* :mod:`.tasks` -- one small module per Table 6 benchmark; :mod:`.runner` runs one;
* :mod:`.sandbox` -- isolated execution of generated code (HumanEval, MBPP);
* :mod:`.memorization` -- memorization rates and the personal-data scan (:mod:`opengemma.data.pii`);
* :mod:`.sxs` -- side-by-side win rates (Table 5); :mod:`.report` -- tables and JSON;
* :mod:`.cli` -- ``opengemma eval``.

Importing this package imports nothing heavy and changes no global state.
"""

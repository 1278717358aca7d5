"""A candidate next test model and world: a 3x3 grid of shapes, a language prior over weak evidence.

Not shipped yet: ``halluguard.testbed.load()`` still returns the model of ``halluguard.testbed.world``.
The candidate trained here (``candidate/``, see its REPORT.md) meets the recall floor but not the
POPE-random (>= 80) or misleading CHAIR_i (>= 10) floors: it sees faint partners too well for the
prior to pull (see ``candidate/REPORT.md`` for the runs and the diagnostics).

- ``world``: seeded 108x108 scenes of 3-6 shapes on a 3x3 grid; only drawn objects are named,
  annotated or asked about; captions in reading order with position words (25-45 words); partners
  drawn next to their anchor at graded visibility (clear / dim / faint); ``train``, ``test``,
  ``misleading`` and ``faint`` splits.
- ``model``: a LLaVA with a 6-layer text model of 8 heads (GQA, 2 key/value heads) and attention
  dropout, 36 image tokens.
- ``train``: three phases (vision tower with a per-cell head; text-only captions; joint training with
  12% of captions image-dropped), further joint phases with ``--init``.
- ``evaluate``: recall / CHAIR on test, misleading and faint splits, how often the partner is named,
  and POPE.

``python -m halluguard.testbed.diagnostics --model halluguard/testbed/grid/candidate --world
halluguard/testbed/grid/world.py`` measures where its hallucinations come from.
"""

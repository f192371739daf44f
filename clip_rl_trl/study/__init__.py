"""Human discrimination studies (``clip-rl-trl study``): does a person pick out the image from the caption?

- ``design``: :func:`create_study` (caption files + images -> a study folder), :func:`load_study`;
- ``images``: where the images come from (a folder or a data source) and their re-encoded copies;
- ``answers``: the answers JSONL (validation, durable appends, reading back);
- ``simulate``: a simulated annotator on the exact oracle (shapes world);
- ``stats``, ``results``: Wilson intervals, sign tests, kappas; the markdown report and the plot;
- ``server`` (needs ``pip install 'clip-rl-trl[study]'``), ``page``, ``export``: the web page, served or static;
- ``cli``: the ``clip-rl-trl study`` sub-commands.

Only the web server needs the optional web stack; it is imported by ``study serve`` alone. See docs/study.md.
"""

from clip_rl_trl.study.answers import AnswerError, AnswersLog, read_answers, write_answers
from clip_rl_trl.study.design import Study, SystemSpec, create_study, load_study, parse_system
from clip_rl_trl.study.export import export_bundle
from clip_rl_trl.study.images import ImagePool, dataset_images, folder_images
from clip_rl_trl.study.results import format_results, plot_results, study_results
from clip_rl_trl.study.simulate import expected_accuracy, simulate_answers

__all__ = [
    "AnswerError",
    "AnswersLog",
    "ImagePool",
    "Study",
    "SystemSpec",
    "create_study",
    "dataset_images",
    "expected_accuracy",
    "export_bundle",
    "folder_images",
    "format_results",
    "load_study",
    "parse_system",
    "plot_results",
    "read_answers",
    "simulate_answers",
    "study_results",
    "write_answers",
]

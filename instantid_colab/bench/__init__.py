"""The identity benchmark: likeness, prompt-following and time for every setting, side by side.

`python -m instantid_colab bench` makes people x prompts x settings x seeds images on the batch machinery
(one loaded pipeline, resumable, one process per GPU) and scores each image as the papers do:

- `references`: the people (a photo or a folder of photos each); with two or more photos one is held out,
  never given to the generator, and likeness is also measured against it;
- `prompts`: PuLID's protocol prompt and a varied built-in set, each with its source, or a file;
- `grid`: settings as dimensions (or a file of named configurations), each value checked like a manifest's;
- `judges`: the metrics' own models, a face recogniser the generator does not use (SFace) and CLIP;
- `run`: rows, the per-image metrics, the loop; `report`: the table, the plot and the contact sheet.
"""

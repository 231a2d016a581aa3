"""Child pipelines: an album pipeline starts one thumbnail pipeline per photo and waits for
their results; each child's end wakes the album at once (no polling), and a caller can block
on the album's result with Orchestrator.wait.

Run: python docs/examples/children.py
"""

from pydantic import BaseModel

from prorch import OnContinueMixin, OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.testing import Harness


@register_step
class Resize(OnStartMixin, Step):
    name = "Resize"

    def on_start(self):
        self.finish({"thumb": self.params.photo.replace(".jpg", "-small.jpg")})


@register_pipeline
class Thumbnail(Pipeline):
    name = "Thumbnail"
    steps = [Resize]

    class Params(BaseModel):
        photo: str


@register_step
class MakeThumbnails(OnStartMixin, OnContinueMixin, Step):
    name = "MakeThumbnails"

    def on_start(self):
        # idempotent: if this hook runs again (a crash, a retry), the same children come back
        self.metadata["children"] = [
            self.start_child(Thumbnail, {"photo": photo}, key=photo) for photo in self.params.photos
        ]

    def on_continue(self):
        results = [self.child_result(uuid) for uuid in self.metadata["children"]]
        if None in results:  # some still running: their ends wake us before this wait is over
            self.wait(seconds=3600)
            return
        self.finish({"thumbs": [r["thumb"] for r in results]})


@register_pipeline
class Album(Pipeline):
    name = "Album"
    steps = [MakeThumbnails]

    class Params(BaseModel):
        photos: list[str]


h = Harness()
album = h.create(Album, {"photos": ["a.jpg", "b.jpg"]})
h.run_pass()  # the album starts two children and waits
print("children:", [c.status.value for c in h.orchestrator.get(album.uuid).children])
h.run_pass()  # the children run; their ends wake the album
h.run_pass()  # the album reads their results, within the same minute
print("album:", h.status(album.uuid), h.orchestrator.wait(album.uuid, timeout=5))

# The pipeline and steps of the prorch 1.0.1 README, with its indentation made valid Python and
# the two steps it leaves to the reader written "in a similar manner".
from prorch.pipeline.pipeline import Pipeline
from prorch.decorators.decorators import register_pipeline
from prorch.step.step import Step
from prorch.mixins.on_start import OnStartMixin
from prorch.mixins.on_continue import OnContinueMixin
from prorch.decorators.decorators import register_step


@register_step
class  BackupGeneration(OnStartMixin,  OnContinueMixin,  Step):
    name = "BackupGeneration"

    def  on_start(self):
        # Logic for initiating the backup generation
        print("Starting the backup generation process.")

    def  on_continue(self):
        # Logic to proceed with backup generation
        print("Backup generation completed.")
        self.finish() # not necessary in first execution


@register_step
class BackupTransfer(OnStartMixin, OnContinueMixin, Step):
    name = "BackupTransfer"

    def on_start(self):
        print("Starting the transfer.")

    def on_continue(self):
        # finish on the third resume: the transfer takes a while
        self.metadata["checks"] = self.metadata.get("checks", 0) + 1
        print("Transfer check", self.metadata["checks"])
        if self.metadata["checks"] >= 3:
            self.finish()


@register_step
class ProcessCompletionNotification(OnStartMixin, OnContinueMixin, Step):
    name = "ProcessCompletionNotification"

    def on_start(self):
        print("Sending the notification.")

    def on_continue(self):
        print("Notification sent.")
        self.finish()


@register_pipeline
class  BackupAutomationPipeline(Pipeline):
	name = "BackupAutomationPipeline"
	steps = [BackupGeneration, BackupTransfer, ProcessCompletionNotification]

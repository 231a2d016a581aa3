# "Step 3: Execute the Pipeline" of the prorch 1.0.1 README.
from pipelines import BackupAutomationPipeline
from your_repository_implementation import TinyDBRepository

# Example of pipeline execution
pipeline = BackupAutomationPipeline(repository_class=TinyDBRepository)
pipeline.start()
print("UUID", pipeline.uuid)

"""A processor declared with the module-level decorator, found by scanning packages."""

from sqlalchemy.orm import Session

import beanflow as bq
from my_pkgs import models


@bq.processors.registry.processor(channel="files")
def upload_to_s3_for_backup(db: Session, task: bq.Task):
    file = db.query(models.File).filter(models.File.task == task).one()
    file.backed_up = True

"""The reference README's first example, with ``import beanflow as bq``."""

from sqlalchemy.orm import Session

import beanflow as bq

from . import models

app = bq.BeanQueue()


@app.processor(channel="images")
def resize_image(db: Session, task: bq.Task, width: int, height: int):
    image = db.query(models.Image).filter(models.Image.task == task).one()
    image.width, image.height = width, height  # image_utils.resize(...) in the reference
    db.add(image)
    # by default the `processor` decorator has `auto_complete` flag turns on,
    # so it will commit the db changes for us automatically

"""Receive documents: each document row and its workflow run commit together.

python examples/documents/receive.py && beanflow run examples/documents/beanflow.yaml --burst
beanflow runs --config examples/documents/beanflow.yaml
"""

from pathlib import Path

import beanflow as bq
from docs import Base, Document

DOCUMENTS = [
    ("Invoice 2026-114", "Acme Ltd\fWidgets 3 x 12.00\fTotal due 36.00"),
    ("Urgent letter from the bank", "Dear customer,\fplease call us."),
    ("Empty scan", "\f \f"),
]


def main() -> None:
    app = bq.load(Path(__file__).with_name("beanflow.yaml")).app
    app.create_tables()
    Base.metadata.create_all(app.engine)
    with app.session_factory() as session:
        for title, body in DOCUMENTS:
            document = Document(title=title, body=body)
            session.add(document)
            session.flush()
            # a second receive of the same document starts no second run (its key)
            key = f"doc-{document.id}"
            bq.start(session, "process_document", {"document_id": document.id}, key=key)
        session.commit()  # the documents and their runs, or nothing
    print(f"received {len(DOCUMENTS)} documents")


if __name__ == "__main__":
    main()

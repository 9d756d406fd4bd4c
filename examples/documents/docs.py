"""A document pipeline's own tables and steps.

Each step reads and writes the user's tables through ``db`` (the step's own transaction): its
changes commit with its completion and the release of the steps after it, or not at all.
"""

from __future__ import annotations

from sqlalchemy import ForeignKey, String, Text, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


class Document(Base):
    __tablename__ = "documents"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String)
    body: Mapped[str] = mapped_column(Text)  # pages separated by form feeds
    status: Mapped[str] = mapped_column(String, default="received")


class Page(Base):
    __tablename__ = "document_pages"
    document_id: Mapped[int] = mapped_column(ForeignKey(Document.id), primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)


class UnreadableDocument(Exception):
    """A document with nothing to read: retrying will not help."""


def split(db: Session, document_id: int) -> dict:
    """The pages of a document (a fan-out follows over them)."""
    document = db.get(Document, document_id, with_for_update=True)
    pages = [page for page in document.body.split("\f") if page.strip()]
    if not pages:
        raise UnreadableDocument(f"document {document_id} has no text")
    document.status = "splitting"
    return {"document_id": document_id, "pages": list(range(1, len(pages) + 1))}


def read_page(db: Session, document_id: int, page: int) -> int:
    """'OCR' one page: stores its text; returns its word count."""
    document = db.get(Document, document_id)
    text = document.body.split("\f")[page - 1].strip()
    db.merge(Page(document_id=document_id, number=page, text=text))
    return len(text.split())


def classify(db: Session, document_id: int) -> dict:
    title = db.get(Document, document_id).title.lower()
    return {"kind": "invoice" if "invoice" in title else "letter", "urgent": "urgent" in title}


def extract_total(db: Session, document_id: int) -> float:
    """An invoice's total: the last number on its pages."""
    texts = db.scalars(select(Page.text).where(Page.document_id == document_id)).all()
    numbers = [float(w) for text in texts for w in text.split() if w.replace(".", "").isdigit()]
    return numbers[-1] if numbers else 0.0


def publish(db: Session, document_id: int, results: dict) -> dict:
    """The document is done: its summary, from every step before."""
    document = db.get(Document, document_id)
    document.status = "published"
    return {
        "document": document.title,
        "kind": results["classify"]["kind"],
        "words": sum(results["read"]),
        "total": results["total"],  # None when it is no invoice (the step was skipped)
    }


def quarantine(db: Session, input: dict, error: str) -> str:
    """on_failure: the document is set aside, saying why."""
    db.get(Document, input["document_id"]).status = f"quarantined: {error}"
    return error

"""SQLAlchemy 2 (psycopg 3 driver) through both listeners: Core and an ORM roundtrip."""

from __future__ import annotations

import pytest
from sqlalchemy import (Column, ForeignKey, Integer, MetaData, String, Table, create_engine, func, insert, select,
                        text, update)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

pytestmark = pytest.mark.timeout(120)  # a hung proxy fails a test, not the suite


@pytest.fixture
def engine(target):
    eng = create_engine(target.url("postgresql+psycopg"), pool_size=3, max_overflow=2, pool_pre_ping=True)
    yield eng
    eng.dispose()


def test_core(engine, table):
    md = MetaData()
    t = Table(table, md, Column("id", Integer, primary_key=True), Column("name", String(50), nullable=False),
              Column("score", Integer, server_default=text("0")))
    md.drop_all(engine, checkfirst=True)
    md.create_all(engine)
    try:
        with engine.begin() as conn:
            conn.execute(insert(t), [{"id": i, "name": f"n{i}", "score": i % 7} for i in range(100)])
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(t)).scalar_one() == 100
            assert conn.execute(select(t.c.name).where(t.c.id == 42)).scalar_one() == "n42"
            top = conn.execute(select(t.c.score, func.count()).group_by(t.c.score).order_by(t.c.score)).all()
            assert [tuple(r) for r in top][:2] == [(0, 15), (1, 15)]
        # a failed transaction rolls back entirely
        with pytest.raises(IntegrityError):
            with engine.begin() as conn:
                conn.execute(update(t).where(t.c.id == 1).values(score=1000))
                conn.execute(insert(t).values(id=2, name="dup"))
        with engine.connect() as conn:
            assert conn.execute(select(t.c.score).where(t.c.id == 1)).scalar_one() == 1
            assert conn.execute(text("SELECT :a + :b"), {"a": 1, "b": 2}).scalar_one() == 3
    finally:
        md.drop_all(engine)


def test_orm_roundtrip(engine, table):
    class Base(DeclarativeBase):
        pass

    class Author(Base):
        __tablename__ = f"{table}_author"[:63]
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(50))
        books: Mapped[list["Book"]] = relationship(back_populates="author", cascade="all, delete-orphan")

    class Book(Base):
        __tablename__ = f"{table}_book"[:63]
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str] = mapped_column(String(100))
        author_id: Mapped[int] = mapped_column(ForeignKey(f"{Author.__tablename__}.id"))
        author: Mapped[Author] = relationship(back_populates="books")

    Base.metadata.drop_all(engine, checkfirst=True)
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            a = Author(name="Ursula", books=[Book(title="The Dispossessed"), Book(title="The Lathe of Heaven")])
            s.add(a)
            s.commit()
            author_id = a.id
        with Session(engine) as s:
            a = s.get(Author, author_id)
            assert a is not None and sorted(b.title for b in a.books) == ["The Dispossessed", "The Lathe of Heaven"]
            a.name = "Ursula K. Le Guin"
            a.books.pop(0)
            s.commit()
        with Session(engine) as s:
            a = s.scalars(select(Author).where(Author.name.like("Ursula%"))).one()
            assert a.name == "Ursula K. Le Guin" and len(a.books) == 1
            assert s.scalar(select(func.count()).select_from(Book)) == 1
            s.delete(a)
            s.commit()
            assert s.scalar(select(func.count()).select_from(Book)) == 0
    finally:
        Base.metadata.drop_all(engine)

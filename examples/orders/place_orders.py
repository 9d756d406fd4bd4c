"""Place orders: each order row and its charge task commit together.

python examples/orders/place_orders.py && beanflow run examples/orders/beanflow.yaml --burst
"""

from pathlib import Path

from shop import Base, Order

import beanflow as bq


def main() -> None:
    app = bq.load(Path(__file__).with_name("beanflow.yaml")).app
    app.create_tables()
    Base.metadata.create_all(app.engine)
    with app.session_factory() as session:
        for customer, amount in [("ada", 12.5), ("grace", 40), ("linus", 0)]:
            order = Order(customer=customer, amount=amount)
            session.add(order)
            session.flush()
            order.task = bq.enqueue(session, "charge", order_id=order.id)
        session.commit()  # the orders and their tasks, or nothing
    print("placed 3 orders")


if __name__ == "__main__":
    main()

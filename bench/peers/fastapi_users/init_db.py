"""Create the peer's table once, before the workers start (``python init_db.py``)."""

import asyncio

from db import create_db_and_tables, engine


async def main() -> None:
    await create_db_and_tables()
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())

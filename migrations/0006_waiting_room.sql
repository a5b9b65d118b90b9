-- 0006_waiting_room: a sale's optional waiting room (contract v1.1, issue 12).
-- NULL: no room (the default, nothing changes). Otherwise an object
-- {"admit_per_s": int, "pass_seconds": int, "oversubscribe": number, "paused": bool}
-- validated by its shape (flashsale/schemas/bodies.py WaitingRoom); admit_per_s and paused change live
-- through the admin PATCH. Redis's sale hash carries a copy (room_* fields) that
-- the scripts read; this row is what a rebuild of the sale hash restores.
ALTER TABLE sales
    ADD COLUMN waiting_room jsonb NULL
        CHECK (waiting_room IS NULL OR jsonb_typeof(waiting_room) = 'object');

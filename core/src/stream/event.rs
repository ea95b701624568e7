//! The event codec: what the transition script appends to the tenant stream
//! and what the job appends downstream.

use std::collections::HashMap;

use crate::domain::State;

/// One decided transition of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LikeEvent {
    /// The acting user.
    pub mid: i64,
    /// Business of the item.
    pub business_id: i64,
    /// The item.
    pub message_id: i64,
    /// The item's owner.
    pub up_mid: i64,
    /// The state the transition decided.
    pub state: State,
    /// The state before, as the deciding side saw it (informational: the job
    /// derives deltas from the DB, not from this).
    pub prev: State,
    /// The record version (see [`crate::version`]).
    pub version: i64,
    /// Unix milliseconds of the transition.
    pub mtime_ms: i64,
}

/// A stream entry that is not a valid event.
#[derive(Debug, thiserror::Error)]
#[error("malformed event: field {field:?} {problem}")]
pub struct MalformedEvent {
    /// The field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl LikeEvent {
    /// Decodes the field map of a stream entry.
    pub fn decode(fields: &HashMap<String, String>) -> Result<LikeEvent, MalformedEvent> {
        let int = |field: &'static str| -> Result<i64, MalformedEvent> {
            fields
                .get(field)
                .ok_or(MalformedEvent { field, problem: "is missing" })?
                .parse()
                .map_err(|_| MalformedEvent { field, problem: "is not an integer" })
        };
        let state = |field: &'static str| -> Result<State, MalformedEvent> {
            State::from_code(int(field)?).ok_or(MalformedEvent { field, problem: "is not a state" })
        };
        Ok(LikeEvent {
            mid: int("mid")?,
            business_id: int("biz")?,
            message_id: int("msg")?,
            up_mid: int("up")?,
            state: state("st")?,
            prev: state("prev")?,
            version: int("ver")?,
            mtime_ms: int("mt")?,
        })
    }

    /// The field list of the entry, in the order the script writes it.
    pub fn encode(&self) -> Vec<(&'static str, String)> {
        vec![
            ("mid", self.mid.to_string()),
            ("biz", self.business_id.to_string()),
            ("msg", self.message_id.to_string()),
            ("up", self.up_mid.to_string()),
            ("st", self.state.code().to_string()),
            ("prev", self.prev.code().to_string()),
            ("ver", self.version.to_string()),
            ("mt", self.mtime_ms.to_string()),
        ]
    }

    /// The record the event is about.
    pub fn record(&self) -> (i64, i64, i64) {
        (self.mid, self.business_id, self.message_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_bad_fields_are_named() {
        let e = LikeEvent {
            mid: 1,
            business_id: 2,
            message_id: 3,
            up_mid: 4,
            state: State::Like,
            prev: State::Dislike,
            version: 1 << 40,
            mtime_ms: 1_700_000_000_000,
        };
        let mut map: HashMap<String, String> = e.encode().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        assert_eq!(LikeEvent::decode(&map).unwrap(), e);
        map.insert("st".into(), "9".into());
        assert_eq!(LikeEvent::decode(&map).unwrap_err().field, "st");
        map.insert("st".into(), "1".into());
        map.remove("ver");
        assert_eq!(LikeEvent::decode(&map).unwrap_err().field, "ver");
    }
}

//! XML in Eureka's shape, converted to and from the JSON Eureka itself uses for the same
//! documents: an element's attributes are `"@name"` keys, its text beside attributes is `"$"`,
//! an element with only text is a string, and repeated children are an array.

use quick_xml::events::Event;
use quick_xml::Reader;
use serde_json::{Map, Value};

/// Write `value` as the element `name`.
pub fn to_xml(name: &str, value: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    write_element(&mut out, name, value);
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn write_element(out: &mut String, name: &str, value: &Value) {
    match value {
        Value::Array(items) => {
            for item in items {
                write_element(out, name, item);
            }
        }
        Value::Object(map) => {
            out.push('<');
            out.push_str(name);
            for (k, v) in map.iter().filter(|(k, _)| k.starts_with('@')) {
                out.push_str(&format!(" {}=\"{}\"", &k[1..], escape(&scalar(v))));
            }
            out.push('>');
            if let Some(text) = map.get("$") {
                out.push_str(&escape(&scalar(text)));
            }
            for (k, v) in map.iter().filter(|(k, _)| !k.starts_with('@') && *k != "$") {
                write_element(out, k, v);
            }
            out.push_str(&format!("</{name}>"));
        }
        other => out.push_str(&format!("<{name}>{}</{name}>", escape(&scalar(other)))),
    }
}

/// Parse an XML document into (root element name, value).
pub fn from_xml(bytes: &[u8]) -> Result<(String, Value), String> {
    let mut reader = Reader::from_reader(bytes);
    reader.config_mut().trim_text(true);
    // (name, attributes and children so far, text) of every open element
    let mut stack: Vec<Open> = Vec::new();
    let mut buf = Vec::new();
    loop {
        let event = reader.read_event_into(&mut buf).map_err(|e| format!("malformed XML: {e}"))?;
        match event {
            Event::Start(e) => stack.push(open(&e)?),
            Event::Empty(e) => {
                let (name, map, text) = open(&e)?;
                let value = finish(map, text);
                match stack.last_mut() {
                    Some((_, parent, _)) => add_child(parent, name, value),
                    None => return Ok((name, value)),
                }
            }
            Event::End(_) => {
                let (name, map, text) = stack.pop().ok_or("malformed XML: unbalanced end tag")?;
                let value = finish(map, text);
                match stack.last_mut() {
                    Some((_, parent, _)) => add_child(parent, name, value),
                    None => return Ok((name, value)),
                }
            }
            Event::Text(t) => {
                if let Some((_, _, text)) = stack.last_mut() {
                    text.push_str(&t.unescape().map_err(|e| format!("malformed XML text: {e}"))?);
                }
            }
            Event::CData(t) => {
                if let Some((_, _, text)) = stack.last_mut() {
                    text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::Eof => return Err("malformed XML: unexpected end of document".into()),
            _ => {}
        }
        buf.clear();
    }
}

type Open = (String, Map<String, Value>, String);

fn open(e: &quick_xml::events::BytesStart) -> Result<Open, String> {
    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
    let mut map = Map::new();
    for a in e.attributes() {
        let a = a.map_err(|e| format!("malformed XML attribute: {e}"))?;
        let key = format!("@{}", String::from_utf8_lossy(a.key.as_ref()));
        let val = a.unescape_value().map_err(|e| format!("malformed XML attribute: {e}"))?;
        map.insert(key, Value::String(val.into_owned()));
    }
    Ok((name, map, String::new()))
}

fn finish(map: Map<String, Value>, text: String) -> Value {
    if map.is_empty() {
        return Value::String(text);
    }
    let mut map = map;
    if !text.is_empty() {
        map.insert("$".into(), Value::String(text));
    }
    Value::Object(map)
}

fn add_child(parent: &mut Map<String, Value>, name: String, value: Value) {
    match parent.remove(&name) {
        None => {
            parent.insert(name, value);
        }
        Some(Value::Array(mut items)) => {
            items.push(value);
            parent.insert(name, Value::Array(items));
        }
        Some(existing) => {
            parent.insert(name, Value::Array(vec![existing, value]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn eureka_shapes_round_trip() {
        let v = json!({"instanceId": "a:1", "port": {"$": "8080", "@enabled": "true"}, "metadata": {"k": "v & w"}});
        let xml = to_xml("instance", &v);
        assert!(xml.contains(r#"<port enabled="true">8080</port>"#), "{xml}");
        assert!(xml.contains("<k>v &amp; w</k>"), "{xml}");
        let (root, back) = from_xml(xml.as_bytes()).unwrap();
        assert_eq!(root, "instance");
        assert_eq!(back, v);
    }

    #[test]
    fn repeated_children_become_arrays_and_empty_elements_parse() {
        let (_, v) = from_xml(b"<apps><app><name>A</name></app><app><name>B</name></app><x/></apps>").unwrap();
        assert_eq!(v["app"], json!([{"name": "A"}, {"name": "B"}]));
        assert_eq!(v["x"], json!(""));
        assert!(from_xml(b"<a><b></a>").is_err());
        assert!(from_xml(b"<a>").is_err());
    }
}

//! hyper answers a request head it cannot parse (or one [`crate::framing`] refused) itself, with
//! a bare status line and no body, and has no hook to change that. The connection's writer
//! ([`super::client_io`]) recognises that answer here and sends the proxy's JSON error, with its
//! log line, in its place.

/// If `bytes` is hyper's own answer to a request head it could not parse, the JSON answer that
/// replaces it (the error is logged). hyper's answer is a status line of 400, 414 or 431 with
/// only `content-length: 0` and `date` (and perhaps `connection`), written alone: every
/// response of this proxy carries a header more (`content-type`, `via`), so none is mistaken
/// for it. Cheap for everything else: most writes fail the first ten bytes.
pub fn parser_answer(bytes: &[u8], refused: Option<&'static str>) -> Option<Vec<u8>> {
    if bytes.len() < 12 || !bytes.starts_with(b"HTTP/1.1 4") || !matches!(&bytes[9..12], b"400" | b"414" | b"431") {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; 4];
    let mut parsed = httparse::Response::new(&mut headers);
    if parsed.parse(bytes) != Ok(httparse::Status::Complete(bytes.len())) {
        return None;
    }
    let mut date = None;
    for h in parsed.headers.iter() {
        match h.name.to_ascii_lowercase().as_str() {
            "content-length" if h.value == b"0" => {}
            "connection" => {}
            "date" => date = Some(h.value),
            _ => return None,
        }
    }
    let date = date?;
    let status = http::StatusCode::from_u16(parsed.code?).ok()?;
    let detail = match (refused, status.as_u16()) {
        (Some(why), _) => why,
        (None, 414) => "the request target is too long",
        (None, 431) => "the request head is larger than server.max_header_bytes",
        _ => "the request line or a header is not valid HTTP/1.1, or the framing headers conflict",
    };
    let body = crate::error::ProxyError::MalformedHead { status, detail: detail.to_string() }.logged_json_body();
    let mut answer = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncache-control: no-store\r\nconnection: close\r\n\
         content-length: {}\r\ndate: ",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(date);
    answer.extend_from_slice(b"\r\n\r\n");
    answer.extend_from_slice(body.as_bytes());
    Some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER_400: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Thu, 26 Nov 2026 09:30:00 GMT\r\n\r\n";

    #[test]
    fn hypers_bare_parse_error_answer_becomes_a_json_error_with_its_date() {
        let answer = String::from_utf8(parser_answer(HYPER_400, None).expect("recognised")).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-type: application/json\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert!(head.contains("\r\ndate: Thu, 26 Nov 2026 09:30:00 GMT"), "{head}");
        assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "malformed request head");
        assert!(json["detail"].as_str().unwrap().contains("not valid HTTP/1.1"), "{json}");

        let too_large = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let answer = String::from_utf8(parser_answer(too_large, None).expect("recognised")).unwrap();
        assert!(answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{answer}");
        assert!(answer.contains("server.max_header_bytes"), "{answer}");
    }

    #[test]
    fn a_refusal_made_here_gives_its_reason_in_the_answer() {
        let answer = String::from_utf8(parser_answer(HYPER_400, Some("ambiguous framing: why")).unwrap()).unwrap();
        let json: serde_json::Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(json["detail"], "ambiguous framing: why");
    }

    #[test]
    fn responses_of_the_proxy_and_bodies_are_never_taken_for_the_parsers_answer() {
        for bytes in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\ndate: x\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\nvia: 1.1 lotecache\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\ndate: x\r\n\r\n{}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
            b"{\"metadata\": {}}",
        ] {
            assert!(parser_answer(bytes, None).is_none(), "{}", String::from_utf8_lossy(bytes));
        }
    }
}
